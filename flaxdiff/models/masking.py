"""Patch masking for masked DiT training (MicroDiT / MDT style) and resolution-aware position embeddings.

With N = (H / p)(W / p) patch tokens and mask ratio r, each example drops exactly ``M = round(r N)`` patches and
keeps ``K = N - M``, chosen uniformly without replacement by an explicit key:

    keep_idx = sort(argsort(u)[:K]),  u ~ U(0, 1)^{B x N}  from ``jax.random.uniform(key, (B, N))``

The DiT runs a light patch mixer on all N tokens, gathers the K kept tokens, runs its backbone on those only (the
speedup: attention cost ~ K^2, MLP cost ~ K) and scatters the outputs back; masked positions output 0. The loss
counts visible patches only: :func:`masked_diffusion_loss` passes the pixel mask of :func:`pixel_loss_mask` as
``loss_mask`` to :func:`flaxdiff.losses.diffusion_loss` (per-example error = mean over visible pixels), so the
targets at masked positions cannot change the loss and no gradient flows through masked outputs.

How the mask key reaches the model: ``model.apply(..., train=True, mask_key=k)`` masks with ``k``; with
``train=True`` and no ``mask_key`` the model draws the key from the ``'mask'`` rng stream if given, else from
``'dropout'`` (which :class:`flaxdiff.training.Trainer` passes in training). Train a masked DiT through the trainer
with the loss ``flaxdiff.objectives.MaskedDiffusionLoss.for_model(model, diffusion_loss)``, so that the logged and
validated loss is the visible-patch loss (that loss calls the model with ``train=True`` and a mask key in evaluation
too). ``model.apply(..., train=False)`` (sampling) never masks; a finetune phase at ratio 0 uses ``config.replace(mask_ratio=0.0)`` with the same params.

Position embeddings (:func:`position_embedding`) are recomputed for every grid, so a model trained at 16x16 runs
at 32x32 with the same params (progressive resolution); ``base_grid > 0`` rescales positions to a fixed range
(``pos * base_grid / grid``, PixArt-style interpolation) so a larger grid sees the trained range, only finer.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import losses
from flaxdiff.models import layers
from flaxdiff.predictors import Predictor
from flaxdiff.schedules import NoiseSchedule

Array = jax.Array

__all__ = ["num_kept", "keep_indices", "keep_mask", "gather_tokens", "scatter_tokens", "pixel_loss_mask",
           "position_embedding", "visible_patch_loss", "masked_diffusion_loss"]


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = N - round(mask_ratio * N); at least one patch must stay visible."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} is outside [0, 1); use e.g. 0.5 or 0.75 (0 disables masking)")
    kept = num_patches - int(round(mask_ratio * num_patches))
    if kept < 1:
        raise ValueError(f"mask_ratio={mask_ratio!r} masks all {num_patches} patches; use a smaller ratio")
    return kept


def keep_indices(key: Array, batch: int, num_patches: int, mask_ratio: float) -> Array:
    """Sorted indices (B, K) int32 of the kept patches: K distinct uniformly random patches per example."""
    scores = jax.random.uniform(key, (batch, num_patches))
    kept = jax.lax.top_k(-scores, num_kept(num_patches, mask_ratio))[1]
    return jnp.sort(kept, axis=-1).astype(jnp.int32)


def keep_mask(indices: Array, num_patches: int) -> Array:
    """Boolean (B, N) mask, True at the kept patches ``indices`` (B, K)."""
    return jnp.any(jax.nn.one_hot(indices, num_patches, dtype=jnp.bool_), axis=1)


def gather_tokens(tokens: Array, indices: Array) -> Array:
    """tokens (B, N, D), indices (B, K) -> the kept tokens (B, K, D)."""
    return jnp.take_along_axis(tokens, indices[:, :, None], axis=1)


def scatter_tokens(kept: Array, indices: Array, num_patches: int) -> Array:
    """Inverse of :func:`gather_tokens`: (B, K, D) -> (B, N, D), zeros at masked positions."""
    batch, _, width = kept.shape
    out = jnp.zeros((batch, num_patches, width), kept.dtype)
    return out.at[jnp.arange(batch)[:, None], indices].set(kept)


def pixel_loss_mask(indices: Array, height: int, width: int, patch_size: int) -> Array:
    """(B, H, W, 1) float mask, 1 on the pixels of kept patches (row-major patch order, as the DiT patchifies)."""
    grid_h, grid_w = height // patch_size, width // patch_size
    mask = keep_mask(indices, grid_h * grid_w).reshape(-1, grid_h, 1, grid_w, 1)
    mask = jnp.broadcast_to(mask, (mask.shape[0], grid_h, patch_size, grid_w, patch_size))
    return mask.reshape(-1, height, width, 1).astype(jnp.float32)


def position_embedding(dim: int, grid_h: int, grid_w: int, base_grid: int = 0) -> np.ndarray:
    """Fixed 2D sin-cos embedding (H*W, dim) of a grid_h x grid_w patch grid.

    ``base_grid = 0``: integer positions, identical to :func:`flaxdiff.models.layers.sincos_2d` (DiT).
    ``base_grid > 0``: positions ``i * base_grid / grid`` per axis, so every resolution spans [0, base_grid).
    """
    if base_grid <= 0:
        return layers.sincos_2d(dim, grid_h, grid_w)
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64) * base_grid / grid_h,
                             np.arange(grid_w, dtype=np.float64) * base_grid / grid_w, indexing="ij")
    emb = np.concatenate([layers.sincos_1d(dim // 2, rows), layers.sincos_1d(dim // 2, cols)], axis=1)
    return emb.astype(np.float32)


def visible_patch_loss(
    apply_fn: Callable[[Any, Array, Array, Any, Array], Array],
    params: Any,
    x0: Array,
    cond: Mapping[str, Array] | None,
    key: Array,
    schedule: NoiseSchedule,
    predictor: Predictor,
    weighting: losses.Weighting,
    time_sampler: losses.TimeSampler,
    *,
    patch_size: int,
    mask_ratio: float,
    **loss_options: Any,
) -> tuple[Array, dict[str, Array]]:
    """The diffusion loss over the visible patches of a masked denoiser ``apply_fn(params, x, c_noise, cond,
    mask_key) -> F`` (which must mask with ``keep_indices(mask_key, B, N, mask_ratio)``).

    ``key`` splits into (mask_key, loss_key); with M = pixel_loss_mask(keep_indices(mask_key, ...)) (times any
    ``loss_mask`` option) the per-example error is sum(M (F - target)^2) / sum(M), the rest as in
    :func:`flaxdiff.losses.diffusion_loss` with ``loss_key``. mask_ratio 0 is the plain loss (all patches kept).
    Metrics add "keep_indices" (B, K).
    """
    mask_key, loss_key = jax.random.split(key)
    batch, height, width = x0.shape[:3]
    num_patches = (height // patch_size) * (width // patch_size)
    options = dict(loss_options)
    if mask_ratio > 0:
        indices = keep_indices(mask_key, batch, num_patches, mask_ratio)
        mask = pixel_loss_mask(indices, height, width, patch_size)
        if options.get("loss_mask") is not None:
            mask = mask * options["loss_mask"]
        options["loss_mask"] = mask
    else:
        indices = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (batch, num_patches))

    def denoiser(p_: Any, x: Array, c_noise: Array, c: Any) -> Array:
        return apply_fn(p_, x, c_noise, c, mask_key)

    loss, metrics = losses.diffusion_loss(denoiser, params, x0, cond, loss_key, schedule, predictor, weighting,
                                          time_sampler, **options)
    return loss, {**metrics, "keep_indices": indices}


def masked_diffusion_loss(
    model: Any,
    params: Any,
    x0: Array,
    cond: Mapping[str, Array] | None,
    key: Array,
    schedule: NoiseSchedule,
    predictor: Predictor,
    weighting: losses.Weighting,
    time_sampler: losses.TimeSampler,
    **loss_options: Any,
) -> tuple[Array, dict[str, Array]]:
    """:func:`visible_patch_loss` of a masked DiT module: the model is applied with ``train=True,
    mask_key=mask_key`` and the mask geometry is its ``config.patch_size`` / ``config.mask_ratio``. With
    ``model.config.mask_ratio == 0`` this is the plain diffusion loss (the finetune phase). The trainer reaches
    the same loss through :class:`flaxdiff.objectives.MaskedDiffusionLoss`.
    """
    cfg = model.config

    def apply_fn(p_: Any, x: Array, c_noise: Array, c: Any, mask_key: Array) -> Array:
        return model.apply({"params": p_}, x, c_noise, c, train=True, mask_key=mask_key)

    return visible_patch_loss(apply_fn, params, x0, cond, key, schedule, predictor, weighting, time_sampler,
                              patch_size=cfg.patch_size, mask_ratio=cfg.mask_ratio, **loss_options)
