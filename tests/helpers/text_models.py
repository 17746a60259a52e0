"""Tiny random reference text encoders and tokenizer files, built locally (no download) for the parity tests."""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "a photo of a cat", "A Photo Of A Dog!", "the quick brown fox jumps over the lazy dog.",
    "it's a handwritten digit seven, isn't it?", "numbers 0123456789 and more 42",
    "café naïve résumé — déjà vu", "emoji 🙂 and 漢字 text", "multiple   spaces\tand\nnewlines",
    "punctuation: (brackets) [square] {curly} \"quotes\" 'single' ;;; ...", "digit one", "digit two",
    "a handwritten digit zero", "the number 3", "a picture of a five", "handwritten eight", "a nine written by hand",
]
#: Texts for the tokenizer comparison: punctuation, unicode, empty strings, texts longer than the context.
PROMPTS = CORPUS + ["", " ", "x", "UPPER lower MiXeD", "long " * 60, "a very long prompt, " * 30 + "end",
                    "unseen words zyzzyva quokka", "tab\there", "ß ﬁ ﬂ Å Å"]

CLIP_TINY = dict(vocab_size=None, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=24, projection_dim=16)


def write_clip_tokenizer(directory: Path, vocab_size: int = 400) -> dict[str, int]:
    """Train a small byte-level BPE with CLIP's pipeline and write ``vocab.json`` + ``merges.txt``; returns the
    vocabulary (special tokens last, as in CLIP)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                         special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    for char in alphabet:  # every byte both inside and at the end of a word, as CLIP's vocabulary has
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return vocab


def write_clip_model(directory: Path, vocab: dict[str, int], projection: bool, hidden_act: str = "quick_gelu",
                     legacy_eos: bool = False, **overrides: int) -> object:
    """A random transformers CLIP text model saved to ``directory`` (plus the tokenizer files); returns it."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    values = {**CLIP_TINY, "vocab_size": len(vocab), **overrides}
    config = CLIPTextConfig(**values, hidden_act=hidden_act, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=2 if legacy_eos else vocab["<|endoftext|>"], pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return model
