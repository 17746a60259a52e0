"""Per-example grain transforms: resize + crop, flip, channels, scaling, captions.

All act on one example dict ``{"image": (H, W, C), "label": ..., ["caption": str]}``
and return a new dict. Random transforms are ``grain.transforms.RandomMap`` and draw
from the per-record generator grain derives from the loader seed, so they are
reproducible and resume exactly with the iterator state.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

Example = dict[str, Any]
#: ITU-R BT.601 luma weights for RGB -> grayscale: Y = 0.299 R + 0.587 G + 0.114 B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {size} must be positive (an int or (height, width))")
    return height, width


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an (H, W, C) uint8 or [0, 1]-float image (antialiased when shrinking)."""
    resample = Image.Resampling.BICUBIC
    if image.dtype == np.uint8 and image.shape[2] in (1, 3):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        out = np.asarray(pil.resize((width, height), resample), np.uint8)
        return out.reshape(height, width, image.shape[2])
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((width, height), resample)) for c in range(image.shape[2])]
    out = np.stack(channels, axis=-1)
    if image.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resize_and_crop(image: np.ndarray, size: int | Sequence[int],
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale by ``s = max(H_t / H, W_t / W)`` (aspect kept, target covered), then crop to
    ``(H_t, W_t)``: centred when ``rng`` is None, at a uniform random offset otherwise."""
    height, width = _size_hw(size)
    h, w = image.shape[:2]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        if (new_h, new_w) != (h, w):
            image = _resize(image, new_h, new_w)
    h, w = image.shape[:2]
    if rng is None:
        top, left = (h - height) // 2, (w - width) // 2
    else:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    return image[top:top + height, left:left + width]


class ResizeCrop(grain.transforms.RandomMap):
    """Resize keeping the aspect ratio so the image covers ``size``, then crop to ``size``
    (centre crop, or a random crop when ``random_crop=True``)."""

    def __init__(self, size: int | Sequence[int], random_crop: bool = False) -> None:
        self.size = _size_hw(size)
        self.random_crop = random_crop

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        image = resize_and_crop(element["image"], self.size, rng if self.random_crop else None)
        return {**element, "image": image}


class RandomFlip(grain.transforms.RandomMap):
    """Mirror left-right with probability ``probability``: ``x[:, ::-1]``."""

    def __init__(self, probability: float = 0.5) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"flip probability={probability} must be in [0, 1]")
        self.probability = probability

    def random_map(self, element: Example, rng: np.random.Generator) -> Example:
        if rng.random() < self.probability:
            return {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
        return element


class ToChannels(grain.transforms.Map):
    """Make the image have ``channels`` channels: 1 -> C repeats the gray channel,
    3 -> 1 takes the BT.601 luma ``0.299 R + 0.587 G + 0.114 B``."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is not one of (1, 3)")
        self.channels = channels

    def map(self, element: Example) -> Example:
        image = element["image"]
        c = image.shape[2]
        if c == self.channels:
            return element
        if c == 1:
            image = np.repeat(image, self.channels, axis=2)
        elif c == 3 and self.channels == 1:
            luma = image.astype(np.float32) @ LUMA_WEIGHTS
            image = (np.clip(np.round(luma), 0, 255).astype(np.uint8) if image.dtype == np.uint8
                     else luma.astype(np.float32))[:, :, None]
        elif c == 4:
            return self.map({**element, "image": image[:, :, :3]})
        else:
            raise ValueError(f"cannot convert an image with {c} channels to {self.channels}")
        return {**element, "image": image}


class ScaleToSymmetric(grain.transforms.Map):
    """float32 image in [-1, 1]: ``x / 127.5 - 1`` for uint8, ``2 x - 1`` for [0, 1] floats."""

    def map(self, element: Example) -> Example:
        image = element["image"]
        if image.dtype == np.uint8:
            scaled = image.astype(np.float32) / 127.5 - 1.0
        else:
            scaled = image.astype(np.float32) * 2.0 - 1.0
        return {**element, "image": scaled}


class TokenizeCaption(grain.transforms.Map):
    """``element[output_key] = np.asarray(tokenizer(element["caption"]))``.

    ``tokenizer`` is any callable str -> fixed-length int array (so batches stack);
    it must be picklable when ``worker_count > 0``.
    """

    def __init__(self, tokenizer: Callable[[str], Any], output_key: str = "tokens",
                 keep_caption: bool = True) -> None:
        self.tokenizer = tokenizer
        self.output_key = output_key
        self.keep_caption = keep_caption

    def map(self, element: Example) -> Example:
        if "caption" not in element:
            raise ValueError("TokenizeCaption needs examples with a 'caption'; this source has "
                             f"keys {sorted(element)}")
        out = {**element, self.output_key: np.asarray(self.tokenizer(element["caption"]))}
        if not self.keep_caption:
            out.pop("caption")
        return out


def image_transforms(image_size: int | Sequence[int], channels: int | None = None,
                     random_crop: bool = False, random_flip: bool = False,
                     tokenizer: Callable[[str], Any] | None = None
                     ) -> list[grain.transforms.Map | grain.transforms.RandomMap]:
    """The standard chain: resize+crop -> [flip] -> [channels] -> scale to [-1, 1] -> [tokens]."""
    ops: list[Any] = [ResizeCrop(image_size, random_crop=random_crop)]
    if random_flip:
        ops.append(RandomFlip())
    if channels is not None:
        ops.append(ToChannels(channels))
    ops.append(ScaleToSymmetric())
    if tokenizer is not None:
        ops.append(TokenizeCaption(tokenizer))
    return ops
