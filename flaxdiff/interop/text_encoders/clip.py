"""The CLIP text transformer of transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` in Flax Linen.

    h_0 = E_tok[ids] + E_pos[0:L]
    h_i = h'_i + MLP(LN2(h'_i)),  h'_i = h_{i-1} + Attn(LN1(h_{i-1}))      i = 1..N  (pre-LN, causal attention)
    last_hidden_state = LN_final(h_N)
    pooled = last_hidden_state[b, p_b]   p_b = argmax_j ids[b, j]              if eos_token_id == 2 (legacy configs)
                                         p_b = first j with ids[b, j] == eos   otherwise (transformers >= 4.31)
    text_embeds = pooled W_proj                                                 (with projection)

Attention: ``softmax(q k^T / sqrt(d_head) + causal [+ padding mask]) v``; MLP: ``fc2(act(fc1(x)))`` with
``act`` = ``hidden_act`` (``quick_gelu`` for OpenAI CLIP, ``gelu`` for OpenCLIP-converted towers).
``hidden_states`` is ``(h_0, ..., h_N)`` like transformers' ``output_hidden_states``: SDXL uses ``h_{N-1}``
(the penultimate layer, without the final LayerNorm).

Key map (explicit, :func:`key_map`): flax ``encoder/layers_3/self_attn/q_proj/kernel`` is torch
``[text_model.]encoder.layers.3.self_attn.q_proj.weight`` transposed; embeddings and LayerNorms keep their layout;
``text_projection/kernel`` is ``text_projection.weight`` transposed. transformers 5 writes a ``CLIPTextModel``
without the ``text_model.`` prefix and a ``CLIPTextModelWithProjection`` (and older files) with it; both load.
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

__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "config_from_hf", "default_length", "from_state_dict", "hf_config",
           "key_map", "load", "load_hf", "pad_id", "param_shapes", "save", "save_hf"]

# transformers' CLIPTextConfig defaults, for fields a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
}
_PREFIX = "text_model."
_IGNORED = ("vision_model.", "visual_projection.", "logit_scale", "text_model.embeddings.position_ids",
            "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower hyper-parameters (transformers' names, one line each)."""

    vocab_size: int = 49408                 # token table rows
    hidden_size: int = 512                  # width D
    intermediate_size: int = 2048           # MLP hidden width
    num_hidden_layers: int = 12             # transformer layers N
    num_attention_heads: int = 8            # heads (D divisible by it)
    max_position_embeddings: int = 77       # context length
    hidden_act: str = "quick_gelu"          # MLP activation (quick_gelu | gelu | ...)
    layer_norm_eps: float = 1e-5            # LayerNorm epsilon
    eos_token_id: int = 49407               # pooled position: first EOS (argmax of ids when 2, legacy)
    bos_token_id: int = 49406               # start token (informational: the tokenizer adds it)
    pad_token_id: int = 1                   # informational (padding never changes the causal prefix)
    projection_dim: int | None = None       # text_projection output width; None: no projection


class CLIPTextTransformer(nn.Module):
    """``apply({'params': p}, ids (B, L), attention_mask=None) -> dict`` with ``last_hidden_state`` (B, L, D),
    ``hidden_states`` (N + 1 of (B, L, D)), ``pooler_output`` (B, D) and, with a projection, ``text_embeds``."""

    config: CLIPTextConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        batch, length = ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"ids have length {length} > max_position_embeddings={cfg.max_position_embeddings}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by "
                             f"num_attention_heads={cfg.num_attention_heads}")
        ids = jnp.asarray(ids, jnp.int32)
        x = _Embeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, dtype, name="embeddings")(ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & jnp.asarray(attention_mask, bool)[:, None, None, :]
        encoder = _Encoder(cfg, dtype, name="encoder")
        hidden_states = encoder(x, mask)
        last = layer_norm(cfg.layer_norm_eps, dtype, "final_layer_norm")(hidden_states[-1])
        if cfg.eos_token_id == 2:
            position = jnp.argmax(ids, axis=-1)
        else:
            position = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(batch), position]
        out = {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}
        if cfg.projection_dim is not None:
            out["text_embeds"] = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dtype, param_dtype=dtype,
                                          name="text_projection")(pooled)
        return out


class _Embeddings(nn.Module):
    """``E_tok[ids] + E_pos[0:L]`` (submodules ``token_embedding``, ``position_embedding``)."""

    vocab_size: int
    positions: int
    width: int
    dtype: Any

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        tokens = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.dtype,
                          name="token_embedding")(ids)
        table = nn.Embed(self.positions, self.width, dtype=self.dtype, param_dtype=self.dtype,
                         name="position_embedding")
        return tokens + table(jnp.arange(ids.shape[1]))[None]


class _Encoder(nn.Module):
    """The N pre-LN layers; returns ``(h_0, ..., h_N)``."""

    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> tuple[Array, ...]:
        states = [x]
        for index in range(self.config.num_hidden_layers):
            x = _Layer(self.config, self.dtype, name=f"layers_{index}")(x, mask)
            states.append(x)
        return tuple(states)


class _Layer(nn.Module):
    config: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
        x = x + _SelfAttention(cfg.hidden_size, cfg.num_attention_heads, self.dtype, name="self_attn")(h, mask)
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
        h = _MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)
        return x + h


class _SelfAttention(nn.Module):
    width: int
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        head_dim = self.width // self.heads

        def project(name: str) -> Array:
            y = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype, name=name)(x)
            return y.reshape(*x.shape[:2], self.heads, head_dim)

        out = attention(project("q_proj"), project("k_proj"), project("v_proj"), head_dim ** -0.5, mask=mask)
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype,
                        name="out_proj")(out.reshape(*x.shape[:2], self.width))


class _MLP(nn.Module):
    width: int
    hidden: int
    act: str
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(activation(self.act)(h))


# --------------------------------------------------------------------------------------------------------------------
# Config and key map


def config_from_hf(values: Mapping[str, Any], with_projection: bool | None = None) -> CLIPTextConfig:
    """:class:`CLIPTextConfig` from a transformers ``config.json`` dict (``clip_text_model``, or a full ``clip``
    model's ``text_config``). ``with_projection`` defaults to the architecture name
    (``CLIPTextModelWithProjection`` / ``CLIPModel``)."""
    model_type = values.get("model_type", "clip_text_model")
    architectures = list(values.get("architectures") or [])
    if model_type == "clip":
        text = dict(values.get("text_config") or {})
        if with_projection is None:
            with_projection = True
        text["projection_dim"] = values.get("projection_dim", _HF_DEFAULTS["projection_dim"])
        values = text
    elif model_type != "clip_text_model":
        raise ValueError(f"config model_type={model_type!r}; accepted for CLIP: clip_text_model, clip")
    if with_projection is None:
        with_projection = any(name.endswith("WithProjection") for name in architectures)
    cfg = {**_HF_DEFAULTS, **values}
    return CLIPTextConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]), hidden_act=str(cfg["hidden_act"]),
        layer_norm_eps=float(cfg["layer_norm_eps"]), eos_token_id=int(cfg["eos_token_id"]),
        bos_token_id=int(cfg["bos_token_id"]), pad_token_id=int(cfg["pad_token_id"]),
        projection_dim=int(cfg["projection_dim"]) if with_projection else None)


def hf_config(config: CLIPTextConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of ``config`` (inverse of :func:`config_from_hf`)."""
    with_projection = config.projection_dim is not None
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    values["projection_dim"] = config.projection_dim if with_projection else _HF_DEFAULTS["projection_dim"]
    values.update(model_type="clip_text_model",
                  architectures=["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"])
    return values


def key_map(config: CLIPTextConfig, prefix: str = _PREFIX) -> weights.KeyMap:
    """flax path -> (torch key, kind) for every param of :class:`CLIPTextTransformer` (module docstring)."""
    out: weights.KeyMap = {
        "embeddings/token_embedding/embedding": (f"{prefix}embeddings.token_embedding.weight", "copy"),
        "embeddings/position_embedding/embedding": (f"{prefix}embeddings.position_embedding.weight", "copy"),
        "final_layer_norm/scale": (f"{prefix}final_layer_norm.weight", "copy"),
        "final_layer_norm/bias": (f"{prefix}final_layer_norm.bias", "copy"),
    }
    for index in range(config.num_hidden_layers):
        flax_layer, torch_layer = f"encoder/layers_{index}", f"{prefix}encoder.layers.{index}"
        for dense in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj",
                      "mlp/fc1", "mlp/fc2"):
            torch_name = f"{torch_layer}.{dense.replace('/', '.')}"
            out[f"{flax_layer}/{dense}/kernel"] = (f"{torch_name}.weight", "dense")
            out[f"{flax_layer}/{dense}/bias"] = (f"{torch_name}.bias", "copy")
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{flax_layer}/{norm}/scale"] = (f"{torch_layer}.{norm}.weight", "copy")
            out[f"{flax_layer}/{norm}/bias"] = (f"{torch_layer}.{norm}.bias", "copy")
    if config.projection_dim is not None:
        out["text_projection/kernel"] = ("text_projection.weight", "dense")
    return out


def param_shapes(config: CLIPTextConfig, dtype: str = "float32") -> dict[str, tuple[int, ...]]:
    """flax path -> shape of every param (from ``jax.eval_shape``, no compute)."""
    return weights.param_shapes_of(CLIPTextTransformer(config, dtype), (1, config.max_position_embeddings))


def from_state_dict(state: Mapping[str, np.ndarray], config: CLIPTextConfig, dtype: str = "float32"
                    ) -> dict[str, Any]:
    """Flax params from a transformers CLIP text state dict (with or without the ``text_model.`` prefix)."""
    prefix = _PREFIX if f"{_PREFIX}embeddings.token_embedding.weight" in state else ""
    return weights.from_torch(state, key_map(config, prefix), ignore=_IGNORED,
                              expected_shapes=param_shapes(config, dtype), dtype=resolve_dtype(dtype))


def load_hf(directory: str | Path, dtype: str = "float32", with_projection: bool | None = None
            ) -> tuple[CLIPTextTransformer, dict[str, Any], CLIPTextConfig]:
    """``(module, params, config)`` from a transformers CLIP text model directory (``config.json`` +
    ``model.safetensors`` or ``pytorch_model.bin``); the projection is loaded when the architecture has one."""
    directory = Path(directory)
    values = json.loads((directory / "config.json").read_text())
    state = weights.read_state_dict(weights.find_weights(directory, ["model"]))
    if with_projection is None and "text_projection.weight" in state:
        with_projection = True
    config = config_from_hf(values, with_projection)
    params = from_state_dict(state, config, dtype)
    logger.info("loaded CLIP text encoder (%d layers, width %d%s) from %s", config.num_hidden_layers,
                config.hidden_size, f", projection {config.projection_dim}" if config.projection_dim else "", directory)
    return CLIPTextTransformer(config, dtype), params, config


def save_hf(params: Mapping[str, Any], config: CLIPTextConfig, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` as transformers 5 writes ``CLIPTextModel`` (no prefix) or
    ``CLIPTextModelWithProjection`` (``text_model.`` prefix); ``from_pretrained`` loads it."""
    prefix = _PREFIX if config.projection_dim is not None else ""
    return weights.save_model_dir(out_dir, "model.safetensors", weights.to_torch(params, key_map(config, prefix)),
                                  "config.json", hf_config(config))


# Backend protocol of flaxdiff.interop.text_encoders.encoder.
load = load_hf
save = save_hf


def default_length(config: CLIPTextConfig, tokenizer_dir: Path) -> int:
    """CLIP tokenizes to its full context (77 for every released model)."""
    return config.max_position_embeddings


def pad_id(config: CLIPTextConfig) -> int | None:
    """None: the tokenizer's own pad token (``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x)."""
    return None
