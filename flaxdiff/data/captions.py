"""Captions for text-to-image training: an offline caption set for the bundled MNIST and the glue from a
source's captions to the text conditioning of a diffusion model.

MNIST captions: image i with label d gets ``templates[h(i) mod T].format(word=WORDS[d], digit=d)`` with
``h(i) = (i * 7919 + seed) mod 2^31``, so every digit is seen under every template across the dataset.

Text conditioning (frozen encoder E, see :mod:`flaxdiff.models.text`): a caption c becomes

    cond = {"text": E(c).tokens (L, D), "text_mask": mask (L,), "pooled": E(c).pooled (D,)}

The null condition of classifier-free guidance is **zeros**: ``{"text": 0, "text_mask": False, "pooled": 0}``
(broadcast): the model's cross-attention then sees only its learned "no text" token. This is JSON-serialisable
(saved with the checkpoint) and independent of the encoder; it is not the encoder's output for "".
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.data.sources import ArraySource

__all__ = ["DIGIT_WORDS", "MNIST_TEMPLATES", "NULL_TEXT_COND", "TextConditioner",
           "digit_caption", "mnist_captions", "preview_prompts", "tokenize_caption", "with_captions"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "a picture of a {word}",
    "digit {digit}",
    "handwritten {word}",
    "a {word} written by hand",
)
#: The guidance / condition-dropout null: zero embeddings with an all-False mask (see the module docstring).
NULL_TEXT_COND: dict[str, Any] = {"text": 0.0, "text_mask": False, "pooled": 0.0}


def digit_caption(digit: int, template: int = 0) -> str:
    """The caption of ``digit`` (0..9) under template index ``template``."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit={digit} is outside 0..9")
    text = MNIST_TEMPLATES[int(template) % len(MNIST_TEMPLATES)]
    return text.format(word=DIGIT_WORDS[int(digit)], digit=int(digit))


def mnist_captions(labels: Sequence[int] | np.ndarray, seed: int = 0) -> list[str]:
    """One caption per label, the template of row i chosen by the hash of the module docstring."""
    labels = np.asarray(labels).reshape(-1)
    return [digit_caption(int(d), (i * 7919 + seed) % (2 ** 31)) for i, d in enumerate(labels)]


def with_captions(source: Any, captions: str, seed: int = 0) -> Any:
    """``source`` with a ``caption`` per example.

    captions: "mnist" (digit templates from the labels; needs an :class:`ArraySource` with labels 0..9) or
    "source" (the source's own captions: image-folder ``.txt`` sidecars / ``captions.jsonl``, npz ``captions``).
    """
    if captions == "mnist":
        if not isinstance(source, ArraySource):
            raise ValueError(f"captions='mnist' needs an in-memory labelled source (mnist, digits, npz); got "
                             f"{source!r}")
        return ArraySource(source.images, source.labels, mnist_captions(source.labels, seed), source.value_range,
                           name=f"{source.name}:captions{seed}")
    if captions == "source":
        if getattr(source, "captions", None) is None:
            raise ValueError(f"captions='source' but {source!r} has no captions (image folders need <image>.txt "
                             f"files or captions.jsonl; npz files a 'captions' array)")
        return source
    raise ValueError(f"captions={captions!r}; accepted: mnist, source")


def tokenize_caption(text: str, max_len: int) -> np.ndarray:
    """Token ids (max_len,) of one caption (picklable with functools.partial, for grain workers)."""
    from flaxdiff.models.text import tokenize

    return tokenize([str(text)], max_len)[0][0]


class TextConditioner:
    """A frozen text encoder: ``texts -> cond`` and ``token ids -> cond`` (jitted), plus its export directory."""

    def __init__(self, module: Any, params: Any, path: str | None = None) -> None:
        self.module = module
        self.params = jax.tree.map(jnp.asarray, params)
        self.path = path
        self.max_len = int(module.config.max_len)
        self.width = int(module.config.width)

        @jax.jit
        def from_ids(ids: jax.Array) -> dict[str, jax.Array]:
            tokens, pooled, mask = module.apply({"params": self.params}, ids, ids != 0)
            return {"text": tokens, "text_mask": mask, "pooled": pooled}

        self.from_ids = from_ids

    @classmethod
    def create(cls, spec: str, seed: int = 0) -> "TextConditioner":
        """``spec`` is a text-encoder preset (e.g. "text_encoder-tiny", randomly initialised from ``seed``), a
        flaxdiff export directory holding a text encoder, or a pretrained encoder directory (transformers CLIP / T5,
        a diffusers pipeline's ``text_encoder*/``, OpenCLIP, or one written by ``save``), loaded frozen by
        :func:`flaxdiff.interop.load_text_encoder` (``seed`` is unused then)."""
        from flaxdiff import interop, models

        if Path(spec).is_dir():
            from flaxdiff.interop.text_encoders import is_text_encoder_dir, load_text_encoder

            if is_text_encoder_dir(spec):
                return load_text_encoder(spec)
            module, params, config = interop.load_model(spec)
            if config.registry_name != "text_encoder":
                raise ValueError(f"{spec} holds a {config.registry_name!r} model; expected a text_encoder")
            return cls(module, params, str(Path(spec).absolute()))
        if not spec.startswith("text_encoder"):
            raise ValueError(f"text encoder {spec!r} is neither a directory nor a text_encoder preset "
                             f"(text_encoder, text_encoder-tiny)")
        module = models.get(spec)
        ids = jnp.zeros((1, module.config.max_len), jnp.int32)
        params = jax.jit(module.init)(jax.random.PRNGKey(seed), ids)["params"]
        return cls(module, params)

    def save(self, out_dir: str | Path) -> str:
        """Export (config.json + model.safetensors) so a checkpoint can name it; returns the directory."""
        from flaxdiff import interop

        interop.export_params(jax.device_get(self.params), self.module.config, out_dir)
        self.path = str(Path(out_dir).absolute())
        return self.path

    def encode(self, texts: Sequence[str]) -> dict[str, jax.Array]:
        """cond for a list of prompts."""
        from flaxdiff.models.text import tokenize

        ids, _ = tokenize(list(texts), self.max_len)
        return self.from_ids(jnp.asarray(ids))

    def condition_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch with ``tokens`` (from ``make_loader(tokenizer=...)``) as ``{"image", "text", "text_mask",
        "pooled"}`` (labels and caption strings dropped); map a loader with
        ``flaxdiff.data.pipeline.MappedIterator(loader, conditioner.condition_batch)``."""
        cond = self.from_ids(jnp.asarray(batch["tokens"]))
        return {"image": batch["image"], **{k: np.asarray(v) for k, v in cond.items()}}

    def tokenizer(self) -> Any:
        """The per-example tokenizer for :func:`flaxdiff.data.make_loader` (``tokenizer=``)."""
        return functools.partial(tokenize_caption, max_len=self.max_len)


def preview_prompts(source: Any, per_prompt: int, count: int = 10) -> list[str]:
    """Prompts of a preview grid: ``count`` distinct captions of ``source`` (digits 0..9 for MNIST captions), each
    repeated ``per_prompt`` times (one grid row per prompt)."""
    found: list[str] = []
    labels = getattr(source, "labels", None)
    if getattr(source, "captions", None) is None:
        raise ValueError(f"{source!r} has no captions to preview")
    if labels is not None and str(getattr(source, "name", "")).find(":captions") >= 0:
        found = [digit_caption(d, 1) for d in sorted(set(int(v) for v in labels))][:count]
    else:
        for caption in source.captions:
            if caption not in found:
                found.append(caption)
            if len(found) == count:
                break
    return [prompt for prompt in found for _ in range(max(per_prompt, 1))]
