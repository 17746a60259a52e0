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


def write_clip_tokenizer(directory: Path, merges_count: int = 150) -> dict[str, int]:
    """Learn BPE merges with CLIP's pre-tokenisation on :data:`CORPUS` and write them in CLIP's file layouts:
    ``vocab.json`` (256 byte symbols, the same with ``</w>``, one token per merge, ``<|startoftext|>``,
    ``<|endoftext|>`` — the order of the real CLIP vocabulary), ``merges.txt`` and ``bpe_simple_vocab.txt.gz``
    (open_clip's format). Returns the vocabulary."""
    import gzip

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
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # code point order = CLIP's bytes_to_unicode order
    trainer = BpeTrainer(vocab_size=2 * len(alphabet) + merges_count, initial_alphabet=alphabet,
                         end_of_word_suffix="</w>", show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]][:merges_count]
    vocab_list = alphabet + [char + "</w>" for char in alphabet] + ["".join(pair) for pair in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list), "merges must create distinct tokens"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(directory / "bpe_simple_vocab.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines))  # open_clip reads every line after the first as a merge
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


T5_TINY = dict(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20)


def write_t5_tokenizer(directory: Path, vocab_size: int = 90) -> Path:
    """Train a tiny unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos) into
    ``directory/spiece.model``."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "spiece"), vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (directory / "spiece.vocab").unlink()
    return directory / "spiece.model"


def write_t5_model(directory: Path, vocab_size: int, feed_forward_proj: str) -> object:
    """A random transformers T5EncoderModel saved to ``directory``; returns it."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    config = T5Config(vocab_size=vocab_size, feed_forward_proj=feed_forward_proj, **T5_TINY)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return model


OPENCLIP_TINY = dict(context_length=24, width=32, heads=4, layers=3)


def import_openclip_transformer() -> object:
    """``open_clip.transformer`` without running the package ``__init__`` (it imports torchvision, which is not
    installed here): the package is registered bare and torchvision's one needed name is stubbed."""
    import importlib
    import importlib.util
    import sys
    import types

    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    import transformers  # noqa: F401  (imported first: it probes for torchvision, which must not see the stub)

    stubs = []
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            sys.modules[name] = types.ModuleType(name)
            stubs.append(name)
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["open_clip"] = package
    try:
        module = importlib.import_module("open_clip.transformer")
        importlib.import_module("open_clip.tokenizer")
    finally:
        for name in stubs:
            del sys.modules[name]
    return module


def write_openclip(directory: Path, vocab: dict[str, int], embed_dim: int = 16, quick_gelu: bool = False,
                   ls_init_value: float | None = None, **text_cfg: object) -> object:
    """A random open_clip TextTransformer saved as an OpenCLIP checkpoint (``open_clip_config.json`` +
    ``open_clip_pytorch_model.bin``, the vision-free subset of a full CLIP state dict); returns the tower."""
    import torch

    transformer = import_openclip_transformer()
    torch.manual_seed(2)
    act = transformer.QuickGELU if quick_gelu else torch.nn.GELU
    tower = transformer.TextTransformer(vocab_size=len(vocab), output_dim=embed_dim, act_layer=act,
                                        ls_init_value=ls_init_value, **OPENCLIP_TINY, **text_cfg).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("in_proj_bias") or name.endswith("out_proj.bias") or name == "text_projection.bias":
                param.normal_(0.0, 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    state = {**tower.state_dict(), "logit_scale": torch.tensor(4.6)}
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    config = {"model_cfg": {"embed_dim": embed_dim, "quick_gelu": quick_gelu,
                            "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 16},
                            "text_cfg": {**OPENCLIP_TINY, "vocab_size": len(vocab), "ls_init_value": ls_init_value,
                                         **text_cfg}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return tower
