"""Tokenizers read from a model directory with well-kept libraries: ``tokenizers`` for CLIP's byte-level BPE
(``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) and ``sentencepiece`` for T5 (``spiece.model``).

Every tokenizer maps a list of texts to ``(ids (N, L) int32, mask (N, L) bool)`` the way transformers' tokenizers
do with ``padding="max_length", truncation=True, max_length=L``:

    CLIP      [BOS] + bpe(text)[: L - 2] + [EOS] + [PAD] * rest        mask = 1 on BOS..EOS
    OpenCLIP  the same after open_clip's cleaning (ftfy, HTML unescape), PAD = 0 (``open_clip.tokenize``)
    T5        sp(text)[: L - 1] + [EOS] + [PAD] * rest                  mask = 1 up to EOS
              (``spiece.model`` with sentencepiece; a ``tokenizer.json`` alone with ``tokenizers``)

Special-token strings typed inside a prompt (``<|endoftext|>``, ``</s>``, ``<extra_id_0>``) are matched as special
tokens by the CLIP tokenizers, as transformers does, but encoded as plain text by the sentencepiece T5 tokenizer.

CLIP's BPE pipeline when only ``vocab.json`` + ``merges.txt`` exist (as transformers 5 builds it): NFC, runs of
whitespace -> " ", lowercase; split on ``_CLIP_SPLIT`` (the special tokens, English contractions, letter runs,
single digits, other non-space runs); byte-level alphabet; BPE with end-of-word suffix ``</w>``. Special tokens
come from ``tokenizer_config.json`` / ``special_tokens_map.json`` (SD 2.x pads with ``!``, OpenCLIP with id 0:
``pad_id`` overrides).
"""
from __future__ import annotations

import html
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BPETokenizer", "SentencePieceTokenizer", "first_eos_mask", "load_tokenizer", "openclip_clean",
           "openclip_default_bpe", "openclip_vocab"]

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def first_eos_mask(ids: Any, eos_id: int) -> Any:
    """``mask[b, j] = j <= first position of eos_id in ids[b]`` (all True when a row has no EOS); works on numpy
    and jax arrays. This is the tokenizer's attention mask for rows it produced (the EOS is never truncated)."""
    xp = np if isinstance(ids, np.ndarray) else jnp
    is_eos = ids == eos_id
    position = xp.where(is_eos.any(axis=-1), xp.argmax(is_eos, axis=-1), ids.shape[-1] - 1)
    return xp.arange(ids.shape[-1])[None, :] <= position[:, None]


def _special_tokens(directory: Path) -> dict[str, Any]:
    """Merged ``special_tokens_map.json`` and ``tokenizer_config.json`` (token entries may be dicts)."""
    values: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            values.update(json.loads((directory / name).read_text()))
    out = {}
    for key, value in values.items():
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def openclip_vocab(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of open_clip's merge file (gzip, one merge per line after a header; open_clip reads
    48894 merges): the 256 byte symbols in ``bytes_to_unicode`` order (= code point order), the same with
    ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49408 for the real file)."""
    import gzip

    from tokenizers import pre_tokenizers

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    if any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{path} has a merge line that is not two symbols")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def openclip_default_bpe() -> Path | None:
    """The merge file shipped inside the installed ``open_clip`` package (found without importing it), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
    except ValueError:  # an already imported open_clip module without __spec__
        spec = None
    module = sys.modules.get("open_clip")
    locations = list(getattr(module, "__path__", None) or (spec.submodule_search_locations if spec else None) or [])
    if not locations:
        return None
    path = Path(locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def openclip_clean(text: str) -> str:
    """open_clip's tokenizer cleaning: ``ftfy.fix_text`` (when ftfy is installed: mojibake, ligatures, NFC),
    HTML unescaping twice, whitespace runs -> one space, strip (lowercasing is part of the BPE pipeline)."""
    try:
        import ftfy
    except ImportError:
        logger.warning("ftfy is not installed: OpenCLIP prompts are tokenized without ftfy.fix_text (ligatures and "
                       "mojibake may tokenize differently from open_clip); pip install ftfy")
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class _RowTokenizer:
    """The batch call shared by the tokenizers: ``tokenizer(texts) -> (ids (N, L) int32, mask (N, L) bool)``, one
    row of ``encode_one`` per text and ``mask = first_eos_mask(ids, eos_id)``."""

    max_length: int
    eos_id: int

    def encode_one(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise ValueError("the tokenizer expects a list of strings, got a single str; wrap it in a list")
        ids = np.stack([self.encode_one(text) for text in texts]) if len(texts) else np.zeros(
            (0, self.max_length), np.int32)
        return ids, first_eos_mask(ids, self.eos_id)


class BPETokenizer(_RowTokenizer):
    """CLIP / OpenCLIP tokenizer on a ``tokenizers.Tokenizer`` (picklable: it is rebuilt from its JSON); also T5
    from a ``tokenizer.json`` without ``spiece.model`` (``bos_id=None``)."""

    def __init__(self, tokenizer: Any, bos_id: int | None, eos_id: int, pad_id: int, max_length: int,
                 clean: str = "none") -> None:
        if clean not in ("none", "openclip"):
            raise ValueError(f"clean={clean!r}; accepted: none, openclip")
        self.tokenizer = tokenizer
        self.clean = clean
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_length = int(max_length)
        specials = 1 + (self.bos_id is not None)
        if self.max_length < specials:
            raise ValueError(f"max_length={max_length} leaves no room for the special tokens; use >= {specials}")

    @classmethod
    def t5_from_json(cls, directory: str | Path, max_length: int) -> "BPETokenizer":
        """A T5 tokenizer from ``tokenizer.json`` alone (no ``spiece.model``): ``ids[: L - 1] + [EOS]``, no BOS."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        special = _special_tokens(directory)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        eos, pad = special.get("eos_token") or "</s>", special.get("pad_token") or "<pad>"
        eos_id, pad_id = tokenizer.token_to_id(eos), tokenizer.token_to_id(pad)
        if eos_id is None or pad_id is None:
            raise ValueError(f"{directory / 'tokenizer.json'} has no id for eos {eos!r} or pad {pad!r}")
        return cls(tokenizer, None, eos_id, pad_id, max_length)

    @classmethod
    def from_dir(cls, directory: str | Path, max_length: int, pad_id: int | None = None,
                 clean: str = "none") -> "BPETokenizer":
        """From ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` in ``directory``; ``clean="openclip"`` first
        applies open_clip's text cleaning (:func:`openclip_clean`)."""
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        directory = Path(directory)
        special = _special_tokens(directory)
        bos = special.get("bos_token") or "<|startoftext|>"
        eos = special.get("eos_token") or "<|endoftext|>"
        unk = special.get("unk_token") or "<|endoftext|>"
        pad = special.get("pad_token") or "<|endoftext|>"
        gz_files = sorted(directory.glob("bpe_simple_vocab*.txt.gz"))
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.no_truncation()
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file() or gz_files:
            if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
                vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
                lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
                merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
            else:
                vocab, merges = openclip_vocab(gz_files[0])
            tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                      end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
            tokenizer.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
            tokenizer.decoder = decoders.ByteLevel()
            tokenizer.add_special_tokens(list(dict.fromkeys([bos, eos, unk, pad])))
        else:
            raise ValueError(f"no CLIP tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt or "
                             f"open_clip's bpe_simple_vocab_16e6.txt.gz")
        ids = {name: tokenizer.token_to_id(token) for name, token in (("bos", bos), ("eos", eos), ("pad", pad))}
        missing = [f"{name} {token!r}" for (name, token) in (("bos", bos), ("eos", eos), ("pad", pad))
                   if ids[name] is None]
        if missing and not (missing == [f"pad {pad!r}"] and pad_id is not None):
            raise ValueError(f"tokenizer in {directory} has no id for {', '.join(missing)}")
        return cls(tokenizer, ids["bos"], ids["eos"], ids["pad"] if pad_id is None else pad_id, max_length, clean)

    def encode_one(self, text: str) -> np.ndarray:
        """ids (max_length,) int32 of one text."""
        text = openclip_clean(str(text)) if self.clean == "openclip" else str(text)
        start = 0 if self.bos_id is None else 1
        body = self.tokenizer.encode(text, add_special_tokens=False).ids[: self.max_length - 1 - start]
        row = np.full((self.max_length,), self.pad_id, np.int32)
        if self.bos_id is not None:
            row[0] = self.bos_id
        row[start:start + len(body)] = body
        row[start + len(body)] = self.eos_id
        return row

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["tokenizer"] = self.tokenizer.to_str()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        state = dict(state)
        state["tokenizer"] = Tokenizer.from_str(state["tokenizer"])
        self.__dict__.update(state)

    def files(self) -> dict[str, str]:
        """Files that rebuild this tokenizer: ``tokenizer.json`` and ``tokenizer_config.json``."""
        config = {"eos_token": self.tokenizer.id_to_token(self.eos_id),
                  "pad_token": self.tokenizer.id_to_token(self.pad_id), "model_max_length": self.max_length}
        if self.bos_id is not None:
            config.update(bos_token=self.tokenizer.id_to_token(self.bos_id), unk_token=config["eos_token"])
        return {"tokenizer.json": self.tokenizer.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


class SentencePieceTokenizer(_RowTokenizer):
    """T5 tokenizer on ``sentencepiece`` (``spiece.model``); picklable (the model bytes are kept)."""

    def __init__(self, model_proto: bytes, eos_id: int, pad_id: int, max_length: int) -> None:
        import sentencepiece

        self.model_proto = bytes(model_proto)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_length = int(max_length)
        if self.max_length < 1:
            raise ValueError(f"max_length={max_length} leaves no room for EOS; use >= 1")

    @classmethod
    def from_dir(cls, directory: str | Path, max_length: int) -> "SentencePieceTokenizer":
        directory = Path(directory)
        path = directory / "spiece.model"
        if not path.is_file():
            raise ValueError(f"no spiece.model in {directory} (T5 tokenizers are read with sentencepiece)")
        proto = path.read_bytes()
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        eos, pad = processor.eos_id(), processor.pad_id()
        if eos < 0 or pad < 0:
            raise ValueError(f"{path} defines eos_id={eos}, pad_id={pad}; T5 needs both (0 = pad, 1 = eos)")
        return cls(proto, eos, pad, max_length)

    def encode_one(self, text: str) -> np.ndarray:
        body = self.processor.encode(str(text), out_type=int)[: self.max_length - 1]
        row = np.full((self.max_length,), self.pad_id, np.int32)
        row[:len(body)] = body
        row[len(body)] = self.eos_id
        return row

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "processor"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_proto"], state["eos_id"], state["pad_id"], state["max_length"])

    def files(self) -> dict[str, bytes | str]:
        return {"spiece.model": self.model_proto,
                "tokenizer_config.json": json.dumps({"model_max_length": self.max_length}, indent=2)}


def load_tokenizer(directory: str | Path, kind: str, max_length: int, pad_id: int | None = None) -> Any:
    """The tokenizer of ``kind`` ("clip", "openclip": BPE; "t5": sentencepiece) from ``directory``."""
    if kind == "openclip" and not any(any(Path(directory).glob(pattern)) for pattern in (
            "tokenizer.json", "vocab.json", "bpe_simple_vocab*.txt.gz")):
        default = openclip_default_bpe()
        if default is None:
            raise ValueError(f"no tokenizer files in {directory} and open_clip is not installed; copy open_clip's "
                             f"bpe_simple_vocab_16e6.txt.gz (or the model's tokenizer.json) there")
        logger.info("OpenCLIP tokenizer: using open_clip's bundled %s", default)
        directory = default.parent
    if kind in ("clip", "openclip"):
        return BPETokenizer.from_dir(directory, max_length, pad_id=pad_id,
                                     clean="openclip" if kind == "openclip" else "none")
    if kind == "t5":
        if not (Path(directory) / "spiece.model").is_file() and (Path(directory) / "tokenizer.json").is_file():
            return BPETokenizer.t5_from_json(directory, max_length)
        return SentencePieceTokenizer.from_dir(directory, max_length)
    raise ValueError(f"tokenizer kind {kind!r}; accepted: clip, openclip, t5")
