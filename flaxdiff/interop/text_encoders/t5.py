"""The T5 encoder of transformers' ``T5EncoderModel`` (T5, T5 v1.1, Flan-T5, mT5) in Flax Linen.

    h_0 = E[ids]
    h'_i = h_{i-1} + O(softmax(Q K^T + B_rel [+ padding mask]) V)(RMS(h_{i-1}))     no 1/sqrt(d) scaling
    h_i  = h'_i + FF(RMS(h'_i))                                                       i = 1..N
    last_hidden_state = RMS_final(h_N),   RMS(x) = w * x / sqrt(mean(x^2) + eps)

FF: ``wo(act(wi x))`` (original T5, ``feed_forward_proj="relu"``) or ``wo(act(wi_0 x) * wi_1 x)`` (gated, T5 v1.1 /
Flan-T5 ``"gated-gelu"`` with the tanh GELU ``gelu_new``). B_rel[h, q, k] = table[bucket(k - q), h] from the first
block's ``relative_attention_bias``, shared by all blocks. The bucket of r = k - q (bidirectional,
n = num_buckets / 2, m = n / 2), computed on the host in float32 as the reference does:

    n [r > 0] + |r|                                                               if |r| < m
    n [r > 0] + min(n - 1, m + floor(log(|r| / m) / log(max_distance / m) (n - m)))  otherwise

``hidden_states`` is ``(h_0, ..., h_{N-1}, last_hidden_state)`` as transformers 5 returns it (the last entry is the
normed output).

Key map (explicit, :func:`key_map`): ``shared/embedding`` is ``shared.weight`` (or ``encoder.embed_tokens.weight``);
``block_2/q/kernel`` is ``encoder.block.2.layer.0.SelfAttention.q.weight`` transposed, ``block_2/wi_0/kernel`` is
``encoder.block.2.layer.1.DenseReluDense.wi_0.weight`` transposed; ``block_2/layer_0_layer_norm/scale`` is
``encoder.block.2.layer.0.layer_norm.weight``; ``relative_attention_bias`` is block 0's table. A full
``T5ForConditionalGeneration`` file loads too (its ``decoder.*`` and ``lm_head`` are ignored).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.interop.text_encoders import weights
from flaxdiff.interop.text_encoders.layers import activation, attention, resolve_dtype

logger = logging.getLogger(__name__)

Array = jax.Array

__all__ = ["T5EncoderConfig", "T5Encoder", "config_from_hf", "default_length", "hf_config", "key_map", "load",
           "load_hf", "pad_id", "param_shapes", "relative_position_buckets", "save", "save_hf"]

_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu", "pad_token_id": 0, "eos_token_id": 1,
}
_IGNORED = ("decoder.", "lm_head.", "encoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """T5 encoder hyper-parameters (transformers' names, one line each)."""

    vocab_size: int = 32128                       # token table rows
    d_model: int = 512                            # width D
    d_kv: int = 64                                # per-head width (inner width = num_heads * d_kv)
    d_ff: int = 2048                              # feed-forward hidden width
    num_layers: int = 6                           # encoder blocks N
    num_heads: int = 8                            # attention heads
    relative_attention_num_buckets: int = 32      # relative position buckets
    relative_attention_max_distance: int = 128    # distance where the log-spaced buckets end
    layer_norm_epsilon: float = 1e-6              # RMS norm epsilon
    dense_act_fn: str = "relu"                    # FF activation (gelu_new for gated-gelu)
    is_gated_act: bool = False                    # gated FF (wi_0, wi_1) of T5 v1.1 / Flan-T5
    eos_token_id: int = 1                         # informational (the tokenizer appends it)
    pad_token_id: int = 0                         # informational


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional bucket index (length, length) of ``k - q`` (module docstring), float32 like the reference."""
    position = np.arange(length, dtype=np.int64)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def _rms_norm(eps: float, dtype: Any, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=dtype, name=name)


class T5Encoder(nn.Module):
    """``apply({'params': p}, ids (B, L), attention_mask=None) -> dict`` with ``last_hidden_state`` (B, L, D) and
    ``hidden_states`` (h_0, ..., h_{N-1}, last_hidden_state)."""

    config: T5EncoderConfig
    dtype: str = "float32"

    @nn.compact
    def __call__(self, ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        cfg = self.config
        dtype = resolve_dtype(self.dtype)
        ids = jnp.asarray(ids, jnp.int32)
        length = ids.shape[1]
        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype, name="shared")(ids)
        table = self.param("relative_attention_bias", nn.initializers.normal(1.0),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), dtype)
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias = jnp.transpose(table[jnp.asarray(buckets)], (2, 0, 1))[None].astype(jnp.float32)  # (1, H, L, L)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
        states = [x]
        for index in range(cfg.num_layers):
            x = _Block(cfg, dtype, name=f"block_{index}")(x, bias, mask)
            states.append(x)
        last = _rms_norm(cfg.layer_norm_epsilon, dtype, "final_layer_norm")(x)
        return {"last_hidden_state": last, "hidden_states": tuple(states[:-1]) + (last,)}


class _Block(nn.Module):
    config: T5EncoderConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        h = _rms_norm(cfg.layer_norm_epsilon, self.dtype, "layer_0_layer_norm")(x)

        def project(name: str) -> Array:
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)(h)
            return y.reshape(*h.shape[:2], cfg.num_heads, cfg.d_kv)

        heads = attention(project("q"), project("k"), project("v"), 1.0, bias=bias.astype(h.dtype), mask=mask)
        x = x + nn.Dense(cfg.d_model, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                         name="o")(heads.reshape(*h.shape[:2], inner))
        h = _rms_norm(cfg.layer_norm_epsilon, self.dtype, "layer_1_layer_norm")(x)
        act = activation(cfg.dense_act_fn)

        def dense(features: int, name: str, value: Array) -> Array:
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)(value)

        if cfg.is_gated_act:
            hidden = act(dense(cfg.d_ff, "wi_0", h)) * dense(cfg.d_ff, "wi_1", h)
        else:
            hidden = act(dense(cfg.d_ff, "wi", h))
        return x + dense(cfg.d_model, "wo", hidden)


# --------------------------------------------------------------------------------------------------------------------
# Config and key map


def config_from_hf(values: Mapping[str, Any]) -> T5EncoderConfig:
    """:class:`T5EncoderConfig` from a transformers ``config.json`` dict (model_type t5 / mt5)."""
    model_type = values.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise ValueError(f"config model_type={model_type!r}; accepted for T5: t5, mt5")
    cfg = {**_HF_DEFAULTS, **values}
    proj = str(cfg["feed_forward_proj"])
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj={proj!r}; accepted: ACT or gated-ACT (e.g. relu, gated-gelu)")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    activation(act)
    return T5EncoderConfig(
        vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]), d_kv=int(cfg["d_kv"]), d_ff=int(cfg["d_ff"]),
        num_layers=int(cfg["num_layers"]), num_heads=int(cfg["num_heads"]),
        relative_attention_num_buckets=int(cfg["relative_attention_num_buckets"]),
        relative_attention_max_distance=int(cfg["relative_attention_max_distance"]),
        layer_norm_epsilon=float(cfg["layer_norm_epsilon"]), dense_act_fn=act, is_gated_act=parts[0] == "gated",
        eos_token_id=int(cfg["eos_token_id"]), pad_token_id=int(cfg["pad_token_id"]))


def hf_config(config: T5EncoderConfig) -> dict[str, Any]:
    """The transformers ``T5EncoderModel`` ``config.json`` dict of ``config``."""
    act = "gelu" if config.dense_act_fn == "gelu_new" and config.is_gated_act else config.dense_act_fn
    proj = f"gated-{act}" if config.is_gated_act else act
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    values.pop("dense_act_fn")
    values.pop("is_gated_act")
    values.update(model_type="t5", architectures=["T5EncoderModel"], feed_forward_proj=proj, is_encoder_decoder=False,
                  num_decoder_layers=config.num_layers, tie_word_embeddings=True, use_cache=False)
    return values


def key_map(config: T5EncoderConfig) -> weights.KeyMap:
    """flax path -> (torch key, kind) for every param of :class:`T5Encoder`."""
    out: weights.KeyMap = {
        "shared/embedding": ("shared.weight", "copy"),
        "relative_attention_bias": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "copy"),
        "final_layer_norm/scale": ("encoder.final_layer_norm.weight", "copy"),
    }
    ff = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    for index in range(config.num_layers):
        flax_block, torch_block = f"block_{index}", f"encoder.block.{index}.layer"
        for name in ("q", "k", "v", "o"):
            out[f"{flax_block}/{name}/kernel"] = (f"{torch_block}.0.SelfAttention.{name}.weight", "dense")
        for name in ff:
            out[f"{flax_block}/{name}/kernel"] = (f"{torch_block}.1.DenseReluDense.{name}.weight", "dense")
        out[f"{flax_block}/layer_0_layer_norm/scale"] = (f"{torch_block}.0.layer_norm.weight", "copy")
        out[f"{flax_block}/layer_1_layer_norm/scale"] = (f"{torch_block}.1.layer_norm.weight", "copy")
    return out


def param_shapes(config: T5EncoderConfig, dtype: str = "float32") -> dict[str, tuple[int, ...]]:
    """flax path -> shape of every param (``jax.eval_shape``, no compute)."""
    return weights.param_shapes_of(T5Encoder(config, dtype), (1, 4))


def from_state_dict(state: Mapping[str, np.ndarray], config: T5EncoderConfig, dtype: str = "float32"
                    ) -> dict[str, Any]:
    """Flax params from a transformers T5 state dict (encoder-only or full)."""
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state = {**state, "shared.weight": state["encoder.embed_tokens.weight"]}
    return weights.from_torch(state, key_map(config), ignore=_IGNORED, expected_shapes=param_shapes(config, dtype),
                              dtype=resolve_dtype(dtype))


def load_hf(directory: str | Path, dtype: str = "float32") -> tuple[T5Encoder, dict[str, Any], T5EncoderConfig]:
    """``(module, params, config)`` from a transformers T5 directory (``config.json`` + weights)."""
    directory = Path(directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    params = from_state_dict(weights.read_state_dict(weights.find_weights(directory, ["model"])), config, dtype)
    logger.info("loaded T5 encoder (%d blocks, width %d, %s FF) from %s", config.num_layers, config.d_model,
                f"gated {config.dense_act_fn}" if config.is_gated_act else config.dense_act_fn, directory)
    return T5Encoder(config, dtype), params, config


def save_hf(params: Mapping[str, Any], config: T5EncoderConfig, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` as transformers writes ``T5EncoderModel``."""
    return weights.save_model_dir(out_dir, "model.safetensors", weights.to_torch(params, key_map(config)),
                                  "config.json", hf_config(config))


# Backend protocol of flaxdiff.interop.text_encoders.encoder.
load = load_hf
save = save_hf


def default_length(config: T5EncoderConfig, tokenizer_dir: Path) -> int:
    """The tokenizer's ``model_max_length`` when it is set to a sane value, else 512."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    values = json.loads(path.read_text()) if path.is_file() else {}
    length = values.get("model_max_length")
    return int(length) if isinstance(length, int) and 0 < length <= 4096 else 512


def pad_id(config: T5EncoderConfig) -> int | None:
    """None: the sentencepiece model's pad id (0 for T5)."""
    return None
