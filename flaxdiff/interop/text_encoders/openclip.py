"""The OpenCLIP text tower (``open_clip`` ``CLIP.encode_text`` / ``TextTransformer``) in Flax Linen, read from an
OpenCLIP checkpoint in its own weight layout.

    h_0 = E_tok[ids] + P[0:L]
    h_i = h'_i + ls_2 * MLP(LN_2(h'_i)),  h'_i = h_{i-1} + ls_1 * MHA(LN_1(h_{i-1}), causal)      i = 1..N
    last_hidden_state = LN_final(h_N)
    pooled = last_hidden_state[b, argmax_j ids[b, j]]     (pool_type "argmax"; "eos": first eos_id; "first"/"last")
    text_embeds = pooled @ text_projection                (a (D, E) matrix; a Linear when proj_bias)

MHA is ``torch.nn.MultiheadAttention``: ``[q, k, v] = x W_in^T + b_in`` (one fused (3D, D) weight), heads of
D / heads, ``softmax(q k^T / sqrt(d) + mask) v``, then ``out_proj``. MLP: ``c_proj(act(c_fc x))`` with exact GELU
(``quick_gelu: true`` in the model config selects x sigmoid(1.702 x)). ``ls_*`` (layer scale) exists only when
``ls_init_value`` is set.

Key map (explicit, :func:`key_map`), OpenCLIP names on both sides: ``token_embedding.weight``,
``positional_embedding``, ``transformer.resblocks.N.{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,
ln_2,mlp.c_fc,mlp.c_proj}``, ``ln_final``, ``text_projection`` (a matrix, copied as is). The vision tower
(``visual.*``) and ``logit_scale`` / ``logit_bias`` of a full CLIP checkpoint are ignored; a ``text.`` prefix
(``CustomTextCLIP``) is accepted.

Files: a directory with ``open_clip_config.json`` (``{"model_cfg": {...}}`` as on the Hugging Face hub) or a bare
model config json (``{"embed_dim", "text_cfg", ...}`` as in ``open_clip/model_configs``), plus
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``; or :func:`load_checkpoint` for any file pair.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.interop.text_encoders import weights
from flaxdiff.interop.text_encoders.layers import activation, attention, layer_norm, resolve_dtype

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["OpenCLIPTextConfig", "OpenCLIPText", "config_from_openclip", "default_length", "key_map", "load",
           "load_checkpoint", "load_dir", "openclip_config", "pad_id", "param_shapes", "save", "save_dir"]

CONFIG_FILE = "open_clip_config.json"
WEIGHT_STEMS = ("open_clip_model", "open_clip_pytorch_model")
_IGNORED = ("visual.", "logit_scale", "logit_bias", "attn_mask")
_UNSUPPORTED = ("embed_cls", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                "scale_fc", "final_ln_after_pool", "hf_model_name")
_POOL_TYPES = ("argmax", "eos", "first", "last")


@dataclasses.dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP ``text_cfg`` fields this tower implements (one line each)."""

    context_length: int = 77          # positions L
    vocab_size: int = 49408           # token table rows
    width: int = 512                  # width D
    heads: int = 8                    # attention heads
    layers: int = 12                  # residual blocks N
    mlp_ratio: float = 4.0            # MLP hidden width / D
    output_dim: int | None = 512      # projection width E (the model's embed_dim); None: no projection
    proj_bias: bool = False           # projection is a Linear with bias (else a bare (D, E) matrix)
    ls_init_value: float | None = None  # layer scale present when set
    quick_gelu: bool = False          # x sigmoid(1.702 x) instead of exact GELU
    layer_norm_eps: float = 1e-5      # LayerNorm epsilon
    causal: bool = True               # causal mask (no_causal_mask=false)
    pool_type: str = "argmax"         # argmax | eos | first | last
    eos_id: int = 49407               # pool position for pool_type "eos"
    pad_id: int = 0                   # tokenizer padding id (OpenCLIP pads with 0)


class OpenCLIPText(nn.Module):
    """``apply({'params': p}, ids (B, L), attention_mask=None) -> dict`` with ``last_hidden_state``,
    ``hidden_states`` (h_0..h_N), ``pooler_output`` (B, D) and, with a projection, ``text_embeds`` (B, E)."""

    config: OpenCLIPTextConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        ids = jnp.asarray(ids, jnp.int32)
        batch, length = ids.shape
        if length > cfg.context_length:
            raise ValueError(f"ids have length {length} > context_length={cfg.context_length}")
        x = nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=dtype, name="token_embedding")(ids)
        positions = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width),
                               dtype)
        x = x + positions[:length].astype(dtype)[None]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if cfg.causal else None
        if attention_mask is not None:
            pad = jnp.asarray(attention_mask, bool)[:, None, None, :]
            mask = pad if mask is None else mask & pad
        states = [x]
        for index in range(cfg.layers):
            x = _Block(cfg, dtype, name=f"resblocks_{index}")(x, mask)
            states.append(x)
        last = layer_norm(cfg.layer_norm_eps, dtype, "ln_final")(x)
        if cfg.pool_type == "argmax":
            position = jnp.argmax(ids, axis=-1)
        elif cfg.pool_type == "eos":
            position = jnp.argmax((ids == cfg.eos_id).astype(jnp.int32), axis=-1)
        elif cfg.pool_type == "first":
            position = jnp.zeros((batch,), jnp.int32)
        else:
            position = jnp.full((batch,), length - 1, jnp.int32)
        pooled = last[jnp.arange(batch), position]
        out = {"last_hidden_state": last, "hidden_states": tuple(states), "pooler_output": pooled}
        if cfg.output_dim:
            if cfg.proj_bias:
                out["text_embeds"] = nn.Dense(cfg.output_dim, dtype=dtype, param_dtype=dtype,
                                              name="text_projection")(pooled)
            else:
                matrix = self.param("text_projection", nn.initializers.normal(cfg.width ** -0.5),
                                    (cfg.width, cfg.output_dim), dtype)
                out["text_embeds"] = pooled @ matrix.astype(dtype)
        return out


class _Block(nn.Module):
    config: OpenCLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        cfg = self.config
        heads, head_dim = cfg.heads, cfg.width // cfg.heads
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "ln_1")(x)
        qkv = nn.Dense(3 * cfg.width, dtype=self.dtype, param_dtype=self.dtype, name="in_proj")(h)
        q, k, v = (part.reshape(*x.shape[:2], heads, head_dim) for part in jnp.split(qkv, 3, axis=-1))
        h = attention(q, k, v, head_dim ** -0.5, mask=mask).reshape(x.shape)
        h = nn.Dense(cfg.width, dtype=self.dtype, param_dtype=self.dtype, name="out_proj")(h)
        x = x + self._scale("ls_1", h)
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "ln_2")(x)
        h = nn.Dense(int(cfg.width * cfg.mlp_ratio), dtype=self.dtype, param_dtype=self.dtype, name="c_fc")(h)
        h = activation("quick_gelu" if cfg.quick_gelu else "gelu")(h)
        h = nn.Dense(cfg.width, dtype=self.dtype, param_dtype=self.dtype, name="c_proj")(h)
        return x + self._scale("ls_2", h)

    def _scale(self, name: str, h: Array) -> Array:
        if self.config.ls_init_value is None:
            return h
        gamma = self.param(name, nn.initializers.constant(self.config.ls_init_value), (self.config.width,),
                           self.dtype)
        return h * gamma.astype(h.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Config and key map


def config_from_openclip(values: Mapping[str, Any]) -> OpenCLIPTextConfig:
    """:class:`OpenCLIPTextConfig` from an OpenCLIP model config (``{"model_cfg": ...}`` or the bare model config
    with ``embed_dim`` / ``text_cfg`` / ``quick_gelu``); ValueError for text-tower features not implemented."""
    if "model_cfg" in values:
        values = values["model_cfg"]
    if "text_cfg" not in values:
        raise ValueError(f"OpenCLIP model config has no text_cfg (keys: {sorted(values)})")
    text = dict(values["text_cfg"])
    for name in _UNSUPPORTED:
        if text.get(name):
            raise ValueError(f"OpenCLIP text_cfg sets {name}={text[name]!r}, which flaxdiff's text tower does not "
                             f"implement (supported: the standard CLIP text transformer)")
    if text.get("no_causal_mask") and text.get("use_pad_mask"):
        raise ValueError("OpenCLIP text_cfg use_pad_mask=true is not implemented; accepted: false")
    pool = text.get("pool_type", "argmax")
    if pool not in _POOL_TYPES:
        raise ValueError(f"OpenCLIP text_cfg pool_type={pool!r}; accepted: {', '.join(_POOL_TYPES)}")
    eps = float((text.get("norm_kwargs") or {}).get("eps", 1e-5))
    embed_dim = values.get("embed_dim")
    no_projection = text.get("proj_type", "linear") == "none" or not embed_dim
    return OpenCLIPTextConfig(
        context_length=int(text.get("context_length", 77)), vocab_size=int(text.get("vocab_size", 49408)),
        width=int(text.get("width", 512)), heads=int(text.get("heads", 8)), layers=int(text.get("layers", 12)),
        mlp_ratio=float(text.get("mlp_ratio", 4.0)), output_dim=None if no_projection else int(embed_dim),
        proj_bias=bool(text.get("proj_bias", False)),
        ls_init_value=None if text.get("ls_init_value") is None else float(text["ls_init_value"]),
        quick_gelu=bool(values.get("quick_gelu", False)), layer_norm_eps=eps,
        causal=not text.get("no_causal_mask", False), pool_type=pool, eos_id=int(text.get("eos_id", 49407)),
        pad_id=int(text.get("pad_id", 0)))


def openclip_config(config: OpenCLIPTextConfig) -> dict[str, Any]:
    """The ``open_clip_config.json`` dict (text tower only) describing ``config``."""
    text = {"context_length": config.context_length, "vocab_size": config.vocab_size, "width": config.width,
            "heads": config.heads, "layers": config.layers, "mlp_ratio": config.mlp_ratio,
            "ls_init_value": config.ls_init_value, "proj_bias": config.proj_bias,
            "no_causal_mask": not config.causal, "pool_type": config.pool_type, "eos_id": config.eos_id,
            "pad_id": config.pad_id, "norm_kwargs": {"eps": config.layer_norm_eps},
            "proj_type": "linear" if config.output_dim else "none"}
    return {"model_cfg": {"embed_dim": config.output_dim or 0, "quick_gelu": config.quick_gelu, "text_cfg": text}}


def key_map(config: OpenCLIPTextConfig, prefix: str = "") -> weights.KeyMap:
    """flax path -> (torch key, kind) for every param of :class:`OpenCLIPText` (module docstring)."""
    out: weights.KeyMap = {
        "token_embedding/embedding": (f"{prefix}token_embedding.weight", "copy"),
        "positional_embedding": (f"{prefix}positional_embedding", "copy"),
        "ln_final/scale": (f"{prefix}ln_final.weight", "copy"),
        "ln_final/bias": (f"{prefix}ln_final.bias", "copy"),
    }
    for index in range(config.layers):
        flax_block, torch_block = f"resblocks_{index}", f"{prefix}transformer.resblocks.{index}"
        for flax_name, torch_name in (("in_proj", "attn.in_proj_"), ("out_proj", "attn.out_proj."),
                                      ("c_fc", "mlp.c_fc."), ("c_proj", "mlp.c_proj.")):
            out[f"{flax_block}/{flax_name}/kernel"] = (f"{torch_block}.{torch_name}weight", "dense")
            out[f"{flax_block}/{flax_name}/bias"] = (f"{torch_block}.{torch_name}bias", "copy")
        for norm in ("ln_1", "ln_2"):
            out[f"{flax_block}/{norm}/scale"] = (f"{torch_block}.{norm}.weight", "copy")
            out[f"{flax_block}/{norm}/bias"] = (f"{torch_block}.{norm}.bias", "copy")
        if config.ls_init_value is not None:
            for scale in ("ls_1", "ls_2"):
                out[f"{flax_block}/{scale}"] = (f"{torch_block}.{scale}.gamma", "copy")
    if config.output_dim:
        if config.proj_bias:
            out["text_projection/kernel"] = (f"{prefix}text_projection.weight", "dense")
            out["text_projection/bias"] = (f"{prefix}text_projection.bias", "copy")
        else:
            out["text_projection"] = (f"{prefix}text_projection", "copy")
    return out


def param_shapes(config: OpenCLIPTextConfig, dtype: str = "float32") -> dict[str, tuple[int, ...]]:
    """flax path -> shape of every param (``jax.eval_shape``, no compute)."""
    return weights.param_shapes_of(OpenCLIPText(config, dtype), (1, config.context_length))


def from_state_dict(state: Mapping[str, np.ndarray], config: OpenCLIPTextConfig, dtype: str = "float32"
                    ) -> dict[str, Any]:
    """Flax params from an OpenCLIP state dict (full CLIP or ``text.``-prefixed CustomTextCLIP)."""
    prefix = "text." if "text.token_embedding.weight" in state else ""
    return weights.from_torch(state, key_map(config, prefix), ignore=_IGNORED + ("text.attn_mask",),
                              expected_shapes=param_shapes(config, dtype), dtype=resolve_dtype(dtype))


def load_checkpoint(checkpoint: str | Path, model_config: str | Path | Mapping[str, Any], dtype: str = "float32"
                    ) -> tuple[OpenCLIPText, dict[str, Any], OpenCLIPTextConfig]:
    """``(module, params, config)`` from an OpenCLIP state dict file and its model config (json path or dict)."""
    values = model_config if isinstance(model_config, Mapping) else json.loads(Path(model_config).read_text())
    config = config_from_openclip(values)
    params = from_state_dict(weights.read_state_dict(checkpoint), config, dtype)
    logger.info("loaded OpenCLIP text tower (%d layers, width %d, projection %s) from %s", config.layers,
                config.width, config.output_dim, checkpoint)
    return OpenCLIPText(config, dtype), params, config


def _config_file(directory: Path) -> Path:
    for name in (CONFIG_FILE, "config.json"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"no {CONFIG_FILE} in {directory}")


def load_dir(directory: str | Path, dtype: str = "float32") -> tuple[OpenCLIPText, dict[str, Any],
                                                                      OpenCLIPTextConfig]:
    """:func:`load_checkpoint` on a directory's ``open_clip_config.json`` and ``open_clip_model.safetensors`` /
    ``open_clip_pytorch_model.bin``."""
    directory = Path(directory)
    return load_checkpoint(weights.find_weights(directory, WEIGHT_STEMS), _config_file(directory), dtype)


def save_dir(params: Mapping[str, Any], config: OpenCLIPTextConfig, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (text tower, OpenCLIP key names)."""
    return weights.save_model_dir(out_dir, "open_clip_model.safetensors", weights.to_torch(params, key_map(config)),
                                  CONFIG_FILE, openclip_config(config))


# Backend protocol of flaxdiff.interop.text_encoders.encoder.
load = load_dir
save = save_dir


def default_length(config: OpenCLIPTextConfig, tokenizer_dir: Path) -> int:
    """The tower's context length (77)."""
    return config.context_length


def pad_id(config: OpenCLIPTextConfig) -> int | None:
    """OpenCLIP's tokenizer pads with ``pad_id`` (0), not with the EOS token."""
    return config.pad_id
