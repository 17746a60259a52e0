"""One entry point for pretrained text encoders: :func:`load_text_encoder` -> :class:`PretrainedTextEncoder`.

    encoder = load_text_encoder("sd15/text_encoder")            # or a diffusers root, an HF / OpenCLIP dir
    cond = encoder.encode(["a photo of a cat"])                  # {"text": (B, L, D), "text_mask": (B, L),
                                                                 #  "pooled": (B, P)}

What goes into ``cond`` (``EncodeOptions``, saved with the encoder in ``flaxdiff_text_encoder.json``):

    text       layer="last": the final hidden state after the final norm (CLIP ``last_hidden_state``);
               layer="penultimate": h_{N-1} without the final norm (SDXL); layer=i: h_i of (h_0, ..., h_N)
               (negative i counts from the end), with the final norm when final_norm=True (diffusers' clip_skip)
    text_mask  use_mask=True: the tokenizer's attention mask (1 up to the first EOS), also given to the encoder;
               use_mask=False: all True and the encoder sees every token (SD 1.x/2.x/XL, SD3 and Flux convention)
    pooled     CLIP: text_embeds (projected EOS state) with a projection, else the EOS state;
               OpenCLIP: the projected pooled state; T5: mean of the last hidden state over the prompt's tokens
               (BOS..EOS, whatever use_mask)

``encoder.outputs(ids, mask)`` gives every module output (all hidden states as the reference returns them: for T5
the last entry is the normed output, as in transformers 5), ``encoder.tokenize(texts)`` the ids and mask.

Defaults: use_mask False for CLIP / OpenCLIP (causal: padding never changes the prompt's states), True for T5.
Encoding a batch shards its rows over a ("data", "fsdp") mesh of the local devices when there are several
(params replicated); rows are padded to a multiple of the device count and the padding dropped.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.data.captions import TextConditioner
from flaxdiff.interop.text_encoders import tokenizers
from flaxdiff.interop.text_encoders.layers import layer_norm, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = ["COPY_LIMIT_BYTES", "EncodeOptions", "OPTIONS_FILE", "PretrainedTextEncoder", "detect_kind",
           "is_text_encoder_dir",
           "load_text_encoder"]

OPTIONS_FILE = "flaxdiff_text_encoder.json"
#: ``save()`` copies the weights when the params take at most this many bytes, else it references the source.
COPY_LIMIT_BYTES = 2 * 2 ** 30
KINDS = ("clip", "t5", "openclip")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """What ``encode`` returns (module docstring); None fields take the encoder kind's default."""

    layer: str | int = "last"             # "last" | "penultimate" | index into (h_0, ..., h_N)
    final_norm: bool = False              # apply the final norm to an integer layer (clip_skip)
    max_length: int | None = None         # token length L (default: CLIP context / T5 tokenizer max / 512)
    use_mask: bool | None = None          # mask padding (module docstring); default False CLIP, True T5

    def resolved(self, kind: str, default_length: int) -> "EncodeOptions":
        layer = self.layer
        if isinstance(layer, str) and layer not in ("last", "penultimate"):
            try:
                layer = int(layer)
            except ValueError:
                raise ValueError(f"layer={layer!r}; accepted: last, penultimate or an integer index") from None
        return EncodeOptions(layer, bool(self.final_norm),
                             int(self.max_length) if self.max_length is not None else int(default_length),
                             bool(self.use_mask) if self.use_mask is not None else kind == "t5")


# --------------------------------------------------------------------------------------------------------------------
# Directory layout


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def detect_kind(directory: str | Path) -> str:
    """"clip", "t5" or "openclip" for a model directory (ValueError naming what was found otherwise)."""
    directory = Path(directory)
    saved = _json(directory / OPTIONS_FILE).get("kind")
    if saved:
        return str(saved)
    if (directory / "open_clip_config.json").is_file():
        return "openclip"
    values = _json(directory / "config.json")
    if "text_cfg" in values or "model_cfg" in values:
        return "openclip"
    model_type = values.get("model_type")
    if model_type in ("clip", "clip_text_model"):
        return "clip"
    if model_type in ("t5", "mt5"):
        return "t5"
    raise ValueError(f"{directory} is not a text encoder directory: config.json model_type={model_type!r} "
                     f"(accepted: clip_text_model, clip, t5, mt5) and no open_clip_config.json")


def is_text_encoder_dir(path: str | Path) -> bool:
    """True for a directory :func:`load_text_encoder` reads (a diffusers root counts when it has text_encoder/)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "text_encoder"
    try:
        detect_kind(path)
    except ValueError:
        return False
    return True


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES) or any(
        directory.glob("bpe_simple_vocab*.txt.gz"))


def _tokenizer_dir(directory: Path, kind: str) -> Path:
    """The directory itself when it holds tokenizer files, else the diffusers sibling: text_encoder_2 ->
    tokenizer_2 (text_encoder -> tokenizer); an OpenCLIP dir without any falls back to open_clip's bundled BPE."""
    if _has_tokenizer(directory):
        return directory
    if directory.name.startswith("text_encoder"):
        sibling = directory.parent / ("tokenizer" + directory.name[len("text_encoder"):])
        if _has_tokenizer(sibling):
            return sibling
    if kind == "openclip":
        return directory
    raise ValueError(f"no tokenizer for {directory}: expected one of {', '.join(_TOKENIZER_FILES)} there or in the "
                     f"diffusers sibling tokenizer*/ directory")


# --------------------------------------------------------------------------------------------------------------------
# Backends: load (module, params, config), save, output selection


#: kind -> module implementing ``load(directory, dtype) -> (module, params, config)``,
#: ``save(params, config, out_dir)``, ``default_length(config, tokenizer_dir)`` and ``pad_id(config)``.
_BACKENDS = {"clip": "flaxdiff.interop.text_encoders.clip", "t5": "flaxdiff.interop.text_encoders.t5",
             "openclip": "flaxdiff.interop.text_encoders.openclip"}


def _backend(kind: str) -> Any:
    if kind not in _BACKENDS:
        raise ValueError(f"text encoder kind {kind!r}; accepted: {', '.join(sorted(_BACKENDS))}")
    return importlib.import_module(_BACKENDS[kind])


# --------------------------------------------------------------------------------------------------------------------
# The encoder


class PretrainedTextEncoder(TextConditioner):
    """A frozen pretrained text encoder with its tokenizer: ``encode(texts) -> cond`` (module docstring).

    Also a :class:`flaxdiff.data.captions.TextConditioner`: ``from_ids`` (token ids -> cond, jitted),
    ``tokenizer()`` (picklable per-example tokenizer for the data loader), ``save(out_dir)``, ``max_len``,
    ``width`` (D of ``text``) and ``pooled_width`` (P of ``pooled``).
    """

    def __init__(self, kind: str, module: Any, params: Any, config: Any, text_tokenizer: Any,
                 options: EncodeOptions, path: str | None = None, mesh: Any = None) -> None:
        self.kind = kind
        self.module = module
        self.config = config
        self.text_tokenizer = text_tokenizer
        self.options = options
        self.path = path
        self.max_len = int(text_tokenizer.max_length)
        self.dtype = module.dtype
        if mesh is None and jax.local_device_count() > 1:
            from flaxdiff.training.parallel import make_mesh

            mesh = make_mesh(devices=jax.local_devices())
        self.mesh = mesh
        params = jax.tree.map(jnp.asarray, params)
        if mesh is not None:
            from flaxdiff.training.parallel import replicated

            params = jax.device_put(params, replicated(mesh))
        self.params = params
        shapes = jax.eval_shape(self._forward, self.params, jax.ShapeDtypeStruct((1, self.max_len), jnp.int32))
        self.width = int(shapes["text"].shape[-1])
        self.pooled_width = int(shapes["pooled"].shape[-1])
        self._jitted = jax.jit(self._forward)
        self._outputs = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))

    def _forward(self, params: Any, ids: jax.Array) -> dict[str, jax.Array]:
        options = self.options
        eos_id = self.text_tokenizer.eos_id
        mask = tokenizers.first_eos_mask(ids, eos_id)
        outputs = self.module.apply({"params": params}, ids, mask if options.use_mask else None)
        if options.layer == "last":
            text = outputs["last_hidden_state"]
        else:
            index = -2 if options.layer == "penultimate" else int(options.layer)
            states = outputs["hidden_states"]
            if not -len(states) <= index < len(states):
                raise ValueError(f"layer={options.layer!r} is outside the {len(states)} hidden states "
                                 f"(h_0..h_{len(states) - 1})")
            text = states[index]
            if options.final_norm:
                text = self._final_norm(params, text)
        if self.kind == "t5":
            weights = mask.astype(jnp.float32)[..., None]
            last = outputs["last_hidden_state"].astype(jnp.float32)
            pooled = jnp.sum(last * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        else:
            pooled = outputs.get("text_embeds", outputs["pooler_output"])
        text_mask = mask if options.use_mask else jnp.ones(ids.shape, bool)
        return {"text": text.astype(jnp.float32), "text_mask": text_mask, "pooled": pooled.astype(jnp.float32)}

    def _final_norm(self, params: Any, hidden: jax.Array) -> jax.Array:
        dtype = resolve_dtype(self.dtype)
        if self.kind == "clip":
            norm = layer_norm(self.config.layer_norm_eps, dtype, "final_layer_norm")
            return norm.apply({"params": params["final_layer_norm"]}, hidden)
        if self.kind == "openclip":
            norm = layer_norm(self.config.layer_norm_eps, dtype, "ln_final")
            return norm.apply({"params": params["ln_final"]}, hidden)
        raise ValueError(f"final_norm=True is supported for clip and openclip encoders, not {self.kind!r}")

    def from_ids(self, ids: Any) -> dict[str, jax.Array]:  # type: ignore[override]
        """cond of token ids (B, L) (rows sharded over the mesh when there is one)."""
        ids = jnp.asarray(ids, jnp.int32)
        if ids.ndim != 2 or ids.shape[1] != self.max_len:
            raise ValueError(f"token ids have shape {tuple(ids.shape)}; expected (B, {self.max_len})")
        from flaxdiff.training.parallel import shard_rows

        rows = ids.shape[0]
        ids, pad = shard_rows(ids, self.mesh)
        out = self._jitted(self.params, ids)
        return {key: value[:rows] for key, value in out.items()} if pad else out

    def outputs(self, ids: Any, attention_mask: Any = None) -> dict[str, Any]:
        """Every output of the encoder module (jitted): ``last_hidden_state``, ``hidden_states``, pooled outputs
        (``pooler_output``, ``text_embeds``) as the reference model names them."""
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        return self._outputs(self.params, jnp.asarray(ids, jnp.int32), mask)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N, L) int32, attention mask (N, L) bool)`` as the reference tokenizer gives them."""
        return self.text_tokenizer(list(texts))

    def encode(self, texts: Sequence[str]) -> dict[str, jax.Array]:
        """cond for a list of prompts: ``{"text": (B, L, D), "text_mask": (B, L), "pooled": (B, P)}``."""
        if isinstance(texts, str):
            raise ValueError("encode expects a list of prompts, got a single str; wrap it in a list")
        ids, _ = self.text_tokenizer(list(texts))
        return self.from_ids(ids)

    def tokenizer(self) -> Callable[[str], np.ndarray]:
        """Per-example tokenizer for :func:`flaxdiff.data.make_loader` (picklable)."""
        return self.text_tokenizer.encode_one

    def save(self, out_dir: str | Path, copy_weights: bool | None = None) -> str:
        """Write ``out_dir`` so that :func:`load_text_encoder` reads this encoder back; returns its absolute path.

        copy_weights=True: a self-contained copy (weights in the reference layout, tokenizer files, and the encode
        options in ``flaxdiff_text_encoder.json``). copy_weights=False: only the options file, naming the source
        directory relative to ``out_dir`` (tried first, so a run directory moved together with its encoder still
        loads) and absolute. None (default): copy when the params take at most :data:`COPY_LIMIT_BYTES`.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        size = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(self.params))
        if copy_weights is None:
            copy_weights = size <= COPY_LIMIT_BYTES or self.path is None
        options: dict[str, Any] = {"kind": self.kind, **dataclasses.asdict(self.options), "dtype": self.dtype}
        if copy_weights:
            _backend(self.kind).save(jax.device_get(self.params), self.config, out_dir)
            for name, content in self.text_tokenizer.files().items():
                target = out_dir / name
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content, encoding="utf-8")
        else:
            if self.path is None:
                raise ValueError("copy_weights=False needs an encoder loaded from a directory (self.path is None)")
            source = Path(self.path).absolute()
            options.update(source=os.path.relpath(source, out_dir.absolute()), source_absolute=str(source))
        (out_dir / OPTIONS_FILE).write_text(json.dumps(options, indent=2))
        logger.info("saved %s text encoder (%.1f MB of params, %s) to %s", self.kind, size / 2 ** 20,
                    "copied" if copy_weights else f"referencing {options.get('source_absolute')}", out_dir)
        if copy_weights:
            self.path = str(out_dir.absolute())
        return str(out_dir.absolute())


def _resolve_source(path: Path, saved: dict[str, Any]) -> Path:
    """The encoder directory a reference-only save points at: relative to ``path`` first, then absolute."""
    for candidate in (path / saved["source"], Path(saved.get("source_absolute", ""))):
        if str(candidate) and candidate.is_dir():
            return candidate.resolve()
    raise ValueError(f"{path / OPTIONS_FILE} references the text encoder at {saved['source']!r} (relative) / "
                     f"{saved.get('source_absolute')!r}, and neither exists; copy the encoder there or save it with "
                     f"copy_weights=True")


def load_text_encoder(path: str | Path, dtype: str | None = None, *, subfolder: str | None = None,
                      layer: str | int | None = None, final_norm: bool | None = None, max_length: int | None = None,
                      use_mask: bool | None = None, mesh: Any = None) -> PretrainedTextEncoder:
    """A frozen pretrained text encoder from the files users have (nothing is downloaded):

    - a transformers model dir (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) of
      ``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``CLIPModel`` (text tower), ``T5EncoderModel``;
    - a diffusers pipeline root (``subfolder`` picks ``text_encoder`` (default), ``text_encoder_2``,
      ``text_encoder_3``) or one of those subdirs; the tokenizer comes from the sibling ``tokenizer*/``;
    - an OpenCLIP dir (``open_clip_config.json`` + ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``);
    - a directory written by :meth:`PretrainedTextEncoder.save` (its saved options are the defaults).

    dtype: "float32" (default) or "bfloat16" (params and compute). Other arguments: :class:`EncodeOptions`.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"text encoder path {path} is not a directory")
    if (path / "model_index.json").is_file():
        path = path / (subfolder or "text_encoder")
    elif subfolder:
        path = path / subfolder
    if not path.is_dir():
        raise ValueError(f"{path} does not exist (diffusers text encoders: text_encoder, text_encoder_2, "
                         f"text_encoder_3)")
    kind = detect_kind(path)
    saved = _json(path / OPTIONS_FILE)
    if "source" in saved:  # a reference-only save: load the source with the saved options as defaults
        source = _resolve_source(path, saved)
        saved_options = {key: saved[key] for key in ("layer", "final_norm", "max_length", "use_mask")}
        explicit = {key: value for key, value in (("layer", layer), ("final_norm", final_norm),
                                                  ("max_length", max_length), ("use_mask", use_mask))
                    if value is not None}
        return load_text_encoder(source, dtype or saved.get("dtype"), mesh=mesh, **{**saved_options, **explicit})
    dtype = dtype or saved.get("dtype") or "float32"
    resolve_dtype(dtype)
    base = EncodeOptions(**{key: saved[key] for key in ("layer", "final_norm", "max_length", "use_mask")
                            if key in saved})
    overrides = {key: value for key, value in (("layer", layer), ("final_norm", final_norm),
                                               ("max_length", max_length), ("use_mask", use_mask))
                 if value is not None}
    options = dataclasses.replace(base, **overrides)
    options.resolved(kind, 1)  # validate before reading weights
    token_dir = _tokenizer_dir(path, kind)
    backend = _backend(kind)
    module, params, config = backend.load(path, dtype)
    options = options.resolved(kind, backend.default_length(config, token_dir))
    text_tokenizer = tokenizers.load_tokenizer(token_dir, kind, options.max_length, pad_id=backend.pad_id(config))
    return PretrainedTextEncoder(kind, module, params, config, text_tokenizer, options, str(path.absolute()), mesh)

