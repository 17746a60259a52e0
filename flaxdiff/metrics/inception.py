"""The FID Inception-v3 network in Flax: the TensorFlow graph of the original TTUR FID code as pytorch-fid and
torch-fidelity port it, with pytorch-fid's input handling, and a loader for its published weight file.

Input handling (pytorch-fid ``InceptionV3(resize_input=True, normalize_input=True)``), for images x in [0, 1]:

    x' = bilinear_resize(x, 299 x 299)        (half-pixel centres, no antialiasing: F.interpolate(align_corners=False))
    x'' = 2 x' - 1                            (the [-1, 1] range the TF graph expects)

The network differs from torchvision's Inception-v3 in the pooling branch of its mixed blocks:

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1`` (Mixed_5b-d, 6b-e, 7b): 3x3 average pool, stride 1,
  padding 1, averaging over the *valid* pixels only (TF's ``count_include_pad=False``);
* ``FIDInceptionE_2`` (Mixed_7c): a 3x3 **max** pool, stride 1, padding 1 (a quirk of the TF graph);

and every conv is ``BasicConv2d``: conv without bias, BatchNorm (eps = 1e-3, running statistics) and ReLU,

    y = relu(gamma (conv(x) - mean) / sqrt(var + 1e-3) + beta).

The pool features are the 2048-d global average of Mixed_7c (pytorch-fid's block 3, torch-fidelity's "2048").

Weights: the pytorch-fid release file ``pt_inception-2015-12-05-6726825d.pth`` (a torch pickle, read here only
with ``torch.load(weights_only=True)``) or a safetensors conversion of it (:func:`convert_weights`); keys are the
torch names, e.g. ``Mixed_5b.branch5x5_2.conv.weight`` (O, I, kh, kw) and ``Mixed_5b.branch5x5_2.bn.running_var``.
See docs/fid.md for the download command.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FIDInceptionV3", "FID_WEIGHTS_URL", "INPUT_SIZE", "POOL_DIM", "bilinear_resize", "convert_weights",
           "load_inception_params", "params_from_state_dict", "preprocess"]

#: The weight file pytorch-fid downloads (the TF 2015-12-05 Inception graph ported to torch).
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
POOL_DIM = 2048
BN_EPS = 1e-3

Pad = tuple[tuple[int, int], tuple[int, int]]


def _pad(padding: int | tuple[int, int]) -> Pad:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm with running statistics (eps 1e-3) -> ReLU; params named like torch's
    ``BasicConv2d``: ``conv.kernel`` (kh, kw, I, O), ``bn.scale/bias/mean/var``."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_ch = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, in_ch, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), _pad(self.padding),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        inv = scale * jax.lax.rsqrt(var + BN_EPS)
        return jax.nn.relu(y * inv + (bias - mean * inv))


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, padding 1, over the valid pixels only (count_include_pad=False)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool(valid) -> 1x1; concatenated."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool 3x3/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avgpool(valid) -> 1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool 3x3/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1, where the pool is the
    valid-pixel 3x3 average in Mixed_7b and the 3x3 max (stride 1, padding 1) in Mixed_7c (``max_pool=True``)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_same(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 trunk: (N, H, W, 3) in [-1, 1] (already at 299 x 299 for the standard FID) ->
    pool features (N, 2048), the global average of Mixed_7c."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2, 0)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2, 0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of 1-d linear interpolation with half-pixel centres and no antialiasing (torch
    ``F.interpolate(mode="bilinear", align_corners=False)``): ``s = max((i + 0.5) in / out - 0.5, 0)``,
    ``i0 = floor(s)``, ``i1 = min(i0 + 1, in - 1)``, weights ``(1 - (s - i0), s - i0)``. The source coordinate is
    computed in float32 like torch's kernel, so the weights agree with it to the last bit."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    np.add.at(weights, (np.arange(out_size), lo), np.float32(1.0) - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights


def bilinear_resize(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C) by separable linear interpolation (see :func:`_interpolation_matrix`);
    the identity when H = W = size."""
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    rows = jnp.asarray(_interpolation_matrix(height, size))
    cols = jnp.asarray(_interpolation_matrix(width, size))
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,nhwc->nowc", rows, images, precision=hp)
    return jnp.einsum("pw,nowc->nopc", cols, out, precision=hp)


def preprocess(images: jax.Array, value_range: tuple[float, float] = (-1.0, 1.0), resize: bool = True
               ) -> jax.Array:
    """pytorch-fid's input path: map ``value_range`` to [0, 1], gray -> RGB, resize to 299 (bilinear), then
    ``2 x - 1``. ``images`` is (N, H, W, C) with C in (1, 3), float or uint8 (uint8 is read as 0..255)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images of shape {images.shape}: expected (N, H, W, C) with C in (1, 3)")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        lo, hi = value_range
        x = (images.astype(jnp.float32) - lo) / (hi - lo)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if resize:
        x = bilinear_resize(x, INPUT_SIZE)
    return 2.0 * x - 1.0


# ------------------------------------------------------------------------------------------------------------------
# Weights

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def params_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flax params of :class:`FIDInceptionV3` from a torch FID-Inception state dict (arrays or tensors).

    ``<path>.conv.weight`` (O, I, kh, kw) -> ``<path>.kernel`` (kh, kw, I, O); ``<path>.bn.{weight, bias,
    running_mean, running_var}`` -> ``<path>.{scale, bias, mean, var}``. ``fc.*`` (the 1008-way classifier, not
    part of the pool features) and ``num_batches_tracked`` are ignored; every conv of the trunk must be present.
    """
    params: dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
            continue
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if len(parts) < 3 or parts[-2] not in ("conv", "bn"):
            raise ValueError(f"unexpected key {key!r} in the Inception state dict; expected "
                             f"'<block>[.<branch>].conv.weight' or '<block>[.<branch>].bn.<stat>'")
        node = params
        for name in parts[:-2]:
            node = node.setdefault(name, {})
        if parts[-2] == "conv":
            node["kernel"] = np.transpose(array, (2, 3, 1, 0))
        elif parts[-1] in _BN_NAMES:
            node[_BN_NAMES[parts[-1]]] = array
        else:
            raise ValueError(f"unexpected BatchNorm entry {key!r}; accepted: {sorted(_BN_NAMES)}")
    _check_params(params)
    return params


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    expected = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0),
                                                            jnp.zeros((1, 75, 75, 3)))["params"])
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}


def _check_params(params: Mapping[str, Any]) -> None:
    """Same tree and shapes as a freshly initialised :class:`FIDInceptionV3`."""
    want = _expected_shapes()
    got = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(want) - set(got))
    if missing:
        raise ValueError(f"the Inception weights lack {len(missing)} entries, e.g. {missing[0]}; is this the FID "
                         f"Inception file ({Path(FID_WEIGHTS_URL).name})?")
    wrong = [(k, got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])]
    if wrong:
        raise ValueError(f"Inception weight {wrong[0][0]} has shape {wrong[0][1]}, expected {wrong[0][2]}")


def _read_state_dict(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        import torch

        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ValueError(f"Inception weights {str(path)!r}: expected a .pth (torch) or .safetensors file")


def load_inception_params(path: str | Path) -> dict[str, Any]:
    """Params of :class:`FIDInceptionV3` from ``pt_inception-2015-12-05-6726825d.pth`` (``torch.load`` with
    ``weights_only=True``) or its safetensors conversion."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"Inception weights {str(path)!r} do not exist; download {FID_WEIGHTS_URL} (docs/fid.md)")
    params = params_from_state_dict(_read_state_dict(path))
    logger.info("loaded FID Inception weights from %s", path)
    return params


def convert_weights(src: str | Path, dst: str | Path) -> Path:
    """Write the torch weight file ``src`` once as safetensors ``dst`` (torch names, torch layouts), so later
    runs need neither torch nor a pickle."""
    from safetensors.numpy import save_file

    state = _read_state_dict(Path(src).expanduser())
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in state.items()}
    params_from_state_dict(arrays)
    dst = Path(dst).expanduser()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(dst))
    return dst


def init_params(key: jax.Array, image_size: int = INPUT_SIZE) -> Any:
    """Random params (for tests and shape checks), initialised on a (1, image_size, image_size, 3) input."""
    return FIDInceptionV3().init(key, jnp.zeros((1, image_size, image_size, 3)))["params"]

