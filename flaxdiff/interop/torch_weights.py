"""Torch state dict <-> flax param tree: the array layouts and the diffusers-style key maps every port shares.

A layout says how one array is stored on each side:

    "conv"     torch (O, I, kh, kw)  <->  flax (kh, kw, I, O)      transpose (2, 3, 1, 0) / (3, 2, 0, 1)
    "dense"    torch (O, I)          <->  flax (I, O)              transpose; a torch (O, I, 1, 1) is squeezed first
    "vector"   same on both sides (bias, norm scale, embedding table, ...)

A diffusers key map (:data:`DiffusersKeyMap`) is ``{torch key: (flax path, layout, flax shape)}``, built from the
shapes of a module's params by :func:`key_map_from_shapes` with a port's own ``flax path -> torch key`` naming rule,
and applied in the two directions by :func:`convert_state_dict` and :func:`export_state_dict`. The text encoders
keep their hand-written ``flax path -> (torch key, kind)`` maps (:mod:`flaxdiff.interop.text_encoders.weights`),
whose "dense" kind is the same "dense" layout here.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from flaxdiff.interop import safetensors_io

__all__ = ["DiffusersKeyMap", "LAYOUTS", "convert_state_dict", "export_state_dict", "key_map_from_shapes",
           "layout_of", "save_model_dir", "to_flax_layout", "to_torch_layout", "torch_shape"]

#: torch key -> (flax path, layout, flax shape).
DiffusersKeyMap = dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]]

LAYOUTS = ("conv", "dense", "vector")


def layout_of(flax_path: Sequence[str], ndim: int) -> str:
    """The layout of a flax param: a 4-d ``kernel`` is "conv", a 2-d ``kernel`` "dense", anything else "vector"."""
    if flax_path[-1] != "kernel":
        return "vector"
    return {4: "conv", 2: "dense"}[ndim]


def torch_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The torch shape of a flax param shape: conv (kh, kw, I, O) -> (O, I, kh, kw), dense (I, O) -> (O, I)."""
    if layout == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "dense":
        return (shape[1], shape[0])
    return tuple(shape)


def to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A torch-layout array in flax layout (inverse of :func:`to_torch_layout`; a dense (O, I, 1, 1) -> (I, O))."""
    if layout == "conv" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if layout == "dense" and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array.reshape(array.shape[:2])
    if layout == "dense" and array.ndim == 2:
        return np.transpose(array)
    return array


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A flax-layout array in torch layout: conv (kh, kw, I, O) -> (O, I, kh, kw), dense (I, O) -> (O, I)."""
    if layout == "conv":
        return np.transpose(array, (3, 2, 0, 1))
    if layout == "dense":
        return np.transpose(array)
    return array


def key_map_from_shapes(shapes: Mapping[str, Any], torch_key: Callable[[tuple[str, ...]], str]) -> DiffusersKeyMap:
    """``{torch key: (flax path, layout, flax shape)}`` from a nested tree of arrays / ShapeDtypeStructs, naming
    each flax path with ``torch_key``."""
    out = {}
    for path, leaf in safetensors_io.flatten_tree(shapes).items():
        flax_path = tuple(path.split(safetensors_io.SEPARATOR))
        out[torch_key(flax_path)] = (flax_path, layout_of(flax_path, len(leaf.shape)), tuple(leaf.shape))
    return out


def convert_state_dict(state_dict: Mapping[str, Any], key_map: Mapping[str, tuple[tuple[str, ...], str,
                                                                                    tuple[int, ...]]],
                       what: str, source: str) -> dict[str, Any]:
    """flax params (float32 numpy nested dict) from a torch state dict; ValueError naming the first missing key
    (with its expected torch shape), the first unexpected key (with its shape) or the first shape mismatch."""
    missing = sorted(set(key_map) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(key_map))
    if missing or unexpected:
        parts = []
        if missing:
            path, layout, shape = key_map[missing[0]]
            parts.append(f"{len(missing)} missing keys, first {missing[0]} (expected shape "
                         f"{torch_shape(shape, layout)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first {unexpected[0]} (shape "
                         f"{tuple(np.shape(state_dict[unexpected[0]]))})")
        raise ValueError(f"{what} weights in {source} do not match the config: {'; '.join(parts)}")
    flat = {}
    for key, (path, layout, shape) in key_map.items():
        value = to_flax_layout(np.asarray(state_dict[key]), layout)
        if value.shape != shape:
            raise ValueError(f"{what} weights in {source}: {key} has shape {tuple(np.shape(state_dict[key]))}, "
                             f"expected {torch_shape(shape, layout)}")
        flat[safetensors_io.SEPARATOR.join(path)] = np.ascontiguousarray(value.astype(np.float32))
    return safetensors_io.unflatten_tree(flat)


def export_state_dict(params: Mapping[str, Any], key_map: Mapping[str, tuple[tuple[str, ...], str, tuple[int, ...]]],
                      what: str) -> dict[str, np.ndarray]:
    """The torch state dict (float32 numpy, torch layouts) of flax params; ValueError on the first missing or
    unexpected flax path."""
    flat = safetensors_io.flatten_tree(params)
    expected = {safetensors_io.SEPARATOR.join(path): (key, layout, shape) for key, (path, layout, shape) in
                key_map.items()}
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected:
        first = (f"first missing {missing[0]} (shape {expected[missing[0]][2]})" if missing else
                 f"first unexpected {unexpected[0]} (shape {tuple(np.shape(flat[unexpected[0]]))})")
        raise ValueError(f"{what} params do not match the config: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected; {first}")
    out = {}
    for path, (key, layout, shape) in expected.items():
        value = np.asarray(flat[path], np.float32)
        if value.shape != shape:
            raise ValueError(f"{what} param {path} has shape {value.shape}, expected {shape}")
        out[key] = np.ascontiguousarray(to_torch_layout(value, layout))
    return out


def save_model_dir(out_dir: str | Path, weights_name: str, state: Mapping[str, Any], config_name: str,
                   config_values: Mapping[str, Any]) -> Path:
    """Write ``out_dir/weights_name`` (a torch state dict as safetensors, metadata format=pt, as
    ``from_pretrained`` reads it) and ``out_dir/config_name`` (JSON); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({key: np.ascontiguousarray(np.asarray(value)) for key, value in state.items()},
              str(out_dir / weights_name), metadata={"format": "pt"})
    (out_dir / config_name).write_text(json.dumps(config_values, indent=2))
    return out_dir
