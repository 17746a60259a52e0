"""Reading and writing torch state dicts without executing code, and the explicit key maps of the text encoders.

Reading (:func:`read_state_dict`), safest first:

- ``*.safetensors`` (and sharded ``*.safetensors.index.json``): parsed here from the header (8-byte little-endian
  length + JSON ``{name: {dtype, shape, data_offsets}}``) and memory-mapped, so every dtype including BF16 reads;
- ``*.bin`` / ``*.pt`` / ``*.pth`` (and ``pytorch_model.bin.index.json``): pickles, read **only** through
  ``torch.load(weights_only=True)``, whose restricted unpickler refuses any global that is not a tensor type, so a
  file whose ``__reduce__`` calls ``os.system`` raises instead of running. Without torch such a file is refused with
  the one-line conversion to safetensors (:data:`CONVERT_HINT`).

Key maps: a map is a dict ``flax path ("a/b/kernel") -> (torch key, kind)``; ``kind`` says how the array is laid out:

    "dense"   torch Linear weight (out, in)   <->  flax kernel (in, out)        transpose (torch_weights "dense")
    "copy"    same layout, torch_weights "vector" (bias, LayerNorm weight/bias, embedding table, positional
              table, projection matrix)

:func:`from_torch` and :func:`to_torch` apply a map in the two directions; every key of the map must be present and
every torch key must be used (or match an ``ignore`` prefix), else a ValueError names the first offending key and
its shape.
"""
from __future__ import annotations

import json
import logging
import mmap
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from flaxdiff.interop import torch_weights
from flaxdiff.interop.safetensors_io import flatten_tree, unflatten_tree
from flaxdiff.interop.torch_weights import save_model_dir

logger = logging.getLogger(__name__)

__all__ = ["CONVERT_HINT", "KeyMap", "from_torch", "param_shapes_of", "read_safetensors_file", "read_state_dict",
           "save_model_dir", "to_torch", "write_safetensors_file"]

#: Flax path -> (torch key, kind) with kind "dense" or "copy".
KeyMap = dict[str, tuple[str, str]]

CONVERT_HINT = ("convert it once where torch is installed: python -c \"import sys, torch; "
                "from safetensors.torch import save_file; "
                "save_file({k: v.contiguous() for k, v in torch.load(sys.argv[1], weights_only=True).items()}, "
                "sys.argv[2])\" pytorch_model.bin model.safetensors")

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_KIND_LAYOUTS = {"dense": "dense", "copy": "vector"}


def read_safetensors_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: array}, metadata)`` of one safetensors file (arrays are read-only views of a memory map)."""
    path = Path(path)
    with open(path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8:8 + header_len]))
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    arrays = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; readable: {sorted(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        arrays[name] = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize,
                                     start + begin).reshape(info["shape"])
    return arrays, metadata


def write_safetensors_file(path: str | Path, arrays: Mapping[str, Any],
                           metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{name: array}`` with ``safetensors.numpy.save_file`` (ml_dtypes bfloat16 is stored as BF16)."""
    save_file({name: np.ascontiguousarray(np.asarray(value)) for name, value in arrays.items()}, str(path),
              metadata=dict(metadata) if metadata else None)


def param_shapes_of(module: Any, ids_shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """flax path -> shape of every param of a text encoder module called on int32 ids of ``ids_shape``
    (``jax.eval_shape`` of its init: no compute, no memory)."""
    ids = jnp.zeros(ids_shape, jnp.int32)
    tree = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)["params"]
    return {path: tuple(leaf.shape) for path, leaf in flatten_tree(tree).items()}


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path} is a pickle-based checkpoint and torch is not installed; flaxdiff never unpickles "
                         f"weights itself. {CONVERT_HINT}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path} was refused by torch.load(weights_only=True) (it is not a plain tensor state dict; "
                         f"nothing in it was executed): {str(err).splitlines()[0]}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}; expected a state dict of tensors")
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = tensor.numpy()
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch state dict ``{key: numpy array}`` from a safetensors file, a sharded index ``*.index.json``, or a
    pickle checkpoint (via ``torch.load(weights_only=True)`` only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weight file {path} does not exist")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{path} has no weight_map")
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(read_state_dict(path.parent / shard))
        return out
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)[0]
    if path.suffix in _PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise ValueError(f"weight file {path.name!r} has an unknown format; accepted: .safetensors, "
                     f".safetensors.index.json, {', '.join(_PICKLE_SUFFIXES)}")


def find_weights(directory: Path, stems: Iterable[str]) -> Path:
    """The weight file of ``directory``: for each stem (e.g. "model"), ``stem.safetensors``, its sharded index, then
    the pickle names; raises ValueError listing what was looked for."""
    tried = []
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            tried.append(name)
            if (directory / name).is_file():
                return directory / name
    for stem in stems:
        pickle_stem = "pytorch_model" if stem == "model" else stem
        for name in (f"{pickle_stem}.bin", f"{pickle_stem}.bin.index.json", f"{pickle_stem}.pt", f"{pickle_stem}.pth"):
            tried.append(name)
            if (directory / name).is_file():
                return directory / name
    raise ValueError(f"no weight file in {directory}; looked for {', '.join(tried)}")


def _layout(kind: str, flax_path: str) -> str:
    """The :mod:`flaxdiff.interop.torch_weights` layout of a key-map kind: "dense" is "dense", "copy" is "vector"."""
    if kind not in _KIND_LAYOUTS:
        raise ValueError(f"key map kind {kind!r} for {flax_path}; accepted: dense, copy")
    return _KIND_LAYOUTS[kind]


def from_torch(state: Mapping[str, np.ndarray], key_map: KeyMap, ignore: Iterable[str] = (),
               expected_shapes: Mapping[str, tuple[int, ...]] | None = None, dtype: Any = None) -> dict[str, Any]:
    """Nested flax params from a torch state dict by ``key_map`` (see the module docstring).

    ignore: torch key prefixes that may be present and are dropped (e.g. the vision tower of a full CLIP).
    expected_shapes: flax path -> shape; a mismatch raises naming the key. dtype: cast every array to it.
    """
    ignore = tuple(ignore)
    used = set()
    flat: dict[str, Any] = {}
    for flax_path, (torch_key, kind) in key_map.items():
        layout = _layout(kind, flax_path)
        if torch_key not in state:
            shape = expected_shapes.get(flax_path) if expected_shapes else None
            want = "" if shape is None else f" (expected shape {torch_weights.torch_shape(shape, layout)})"
            raise ValueError(f"missing key {torch_key!r}{want} for {flax_path}; the checkpoint has "
                             f"{len(state)} keys, e.g. {sorted(state)[:3]}")
        used.add(torch_key)
        value = torch_weights.to_flax_layout(np.asarray(state[torch_key]), layout)
        if expected_shapes is not None and tuple(value.shape) != tuple(expected_shapes[flax_path]):
            raise ValueError(f"key {torch_key!r} has shape {tuple(np.shape(state[torch_key]))}; {flax_path} needs "
                             f"{tuple(expected_shapes[flax_path])} (flax layout) — the config does not match the "
                             f"weights")
        if dtype is not None:
            value = value.astype(dtype)
        flat[flax_path] = value
    for torch_key in state:
        if torch_key not in used and not torch_key.startswith(ignore):
            raise ValueError(f"unexpected key {torch_key!r} with shape {tuple(np.shape(state[torch_key]))}: not in "
                             f"the key map of this config (wrong architecture or config?)")
    return unflatten_tree(flat)


def to_torch(params: Mapping[str, Any], key_map: KeyMap) -> dict[str, np.ndarray]:
    """Inverse of :func:`from_torch`: ``{torch key: numpy array}`` (C-contiguous) from nested flax params."""
    flat = flatten_tree(params)
    missing = sorted(set(key_map) - set(flat))
    extra = sorted(set(flat) - set(key_map))
    if missing:
        raise ValueError(f"params lack {missing[0]!r} (torch key {key_map[missing[0]][0]!r})")
    if extra:
        raise ValueError(f"param {extra[0]!r} with shape {tuple(np.shape(flat[extra[0]]))} is not in the key map")
    out = {}
    for flax_path, (torch_key, kind) in key_map.items():
        value = np.asarray(flat[flax_path])
        out[torch_key] = np.ascontiguousarray(torch_weights.to_torch_layout(value, _layout(kind, flax_path)))
    return out
