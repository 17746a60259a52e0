"""ArrayRecord datasets: convert images (+ captions, labels) once into grain-native shards, optionally with
precomputed VAE latents and text embeddings, and read them back as a random-access source.

A converted directory holds ``data-SSSSS-of-NNNNN.array_record`` shards and ``manifest.json``. Every record is
one msgpack map (``flax.serialization.msgpack_serialize``) with the schema

    ========== ============================================ =====================================================
    key        pixel datasets (``convert``)                 encoded datasets (``encode``)
    ========== ============================================ =====================================================
    "image"    uint8 (H, W, C) raw, or PNG bytes            float32 (h, w, c): the *scaled* latent
                                                            ``(z - shift) * scaling_factor`` of the autoencoder
    "label"    int (class index; 0 without classes)         same
    "caption"  str (caption datasets only)                  same
    "text"     -                                            float16 (L, D) token embeddings of the text encoder
    "text_mask" -                                           bool (L,)
    "pooled"   -                                            float16 (D,) pooled embedding
    "id"       str: the source file (relative) or index     same
    ========== ============================================ =====================================================

:class:`ArrayRecordSource` returns the same example dicts as the other sources (:mod:`flaxdiff.data.sources`):
``{"image": uint8 (H, W, C), "label": int32, ["caption": str]}``; for encoded datasets ``image`` is returned as
``(z + 1) / 2`` float32, the convention of :func:`flaxdiff.latents.latent_source`, so that the loader's
``ScaleToSymmetric`` (``2 x - 1``) hands the training step the scaled latent z unchanged (to 1 ulp) with
``make_loader(source, batch, image_size=None)``; ``text``/``text_mask``/``pooled`` come back as float32 / bool.

The manifest (``manifest.json``)::

    {"format": "flaxdiff-arrayrecord", "version": 1, "kind": "pixels" | "latents",
     "count": N, "shards": [{"file": "data-00000-of-00004.array_record", "count": n0}, ...],
     "image_shape": [H, W, C] | null (mixed sizes), "image_encoding": "raw" | "png" | "float32",
     "resolution": int | null, "classes": [names] , "num_classes": K, "caption_field": "caption" | null,
     "source": "<what was converted>", "skipped": k, "skipped_files": [{"file", "error"}, ...],
     # encoded datasets only:
     "pixel_shape": [H, W, C], "latent_shape": [h, w, c],
     "autoencoder": {"path": abs path, "relative_path": path relative to the manifest dir, "scaling_factor",
                     "shift_factor", "latent_channels", "downsample_factor"},
     "text_encoder": {"spec": str, "path": "text_encoder" (relative; exported here), "max_len", "width"} | null,
     "text_dtype": "float16"}
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import pathlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["ArrayRecordSource", "MANIFEST", "convert", "decode_record", "encode", "encode_record",
           "is_converted_dir", "read_manifest"]

MANIFEST = "manifest.json"
PLAN = "convert_plan.json"
FORMAT = "flaxdiff-arrayrecord"
VERSION = 1
WRITER_OPTIONS = "group_size:1"  # one record per chunk: the random access grain's samplers need
DEFAULT_RECORDS_PER_SHARD = 1024
IMAGE_ENCODINGS = ("raw", "png")


# ------------------------------------------------------------------------------------------------------------------
# Records


def encode_record(example: dict[str, Any]) -> bytes:
    """msgpack bytes of one example dict (numpy arrays, str, int, bytes values)."""
    from flax import serialization

    return serialization.msgpack_serialize(dict(example))


def decode_record(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`."""
    from flax import serialization

    return serialization.msgpack_restore(blob)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png_decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as img:
        array = np.asarray(img, np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


# ------------------------------------------------------------------------------------------------------------------
# Reading


def shard_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.array_record"


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a flaxdiff ArrayRecord ``manifest.json``."""
    manifest = pathlib.Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        return False


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a converted directory (ValueError naming the directory when it is not one)."""
    path = pathlib.Path(path)
    if not is_converted_dir(path):
        raise ValueError(f"{str(path)!r} is not a converted ArrayRecord directory (no {MANIFEST} with "
                         f"format {FORMAT!r}); create one with `flaxdiff data convert SRC {path}`")
    return json.loads((path / MANIFEST).read_text())


class _Captions:
    """A lazy, read-only sequence of the captions of a source (reads one record per item)."""

    def __init__(self, source: "ArrayRecordSource") -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return str(self.source.record(index % len(self)).get("caption", ""))


class ArrayRecordSource:
    """Random-access source over a converted directory, read with ``grain.sources.ArrayRecordDataSource``.

    Examples follow the schema of the module docstring; ``captions`` is a lazy sequence (None without captions),
    ``num_classes`` and ``class_names`` come from the manifest. Picklable (grain workers reopen the shards).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        import grain

        self.root = pathlib.Path(root).expanduser().absolute()
        self.manifest = read_manifest(self.root)
        files = [self.root / shard["file"] for shard in self.manifest["shards"]]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{str(self.root)!r}: manifest lists shard {missing[0]} which does not exist")
        self._files = files
        self._source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        if len(self._source) != self.manifest["count"]:
            raise ValueError(f"{str(self.root)!r}: the shards hold {len(self._source)} records but the manifest "
                             f"says {self.manifest['count']}")
        self.kind = self.manifest.get("kind", "pixels")
        self.class_names = list(self.manifest.get("classes") or [])
        self.num_classes = int(self.manifest.get("num_classes") or 0)
        self.captions = _Captions(self) if self.manifest.get("caption_field") else None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])

    def __len__(self) -> int:
        return len(self._source)

    def record(self, index: int) -> dict[str, Any]:
        """The raw decoded record ``index`` (see the schema)."""
        return decode_record(self._source[int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.record(index)
        image = record["image"]
        if isinstance(image, (bytes, bytearray)):
            image = _png_decode(image)
        if self.kind == "latents":
            image = ((np.asarray(image, np.float32) + 1.0) * 0.5).astype(np.float32)
        example: dict[str, Any] = {"image": image, "label": np.int32(record.get("label", 0))}
        if "caption" in record:
            example["caption"] = str(record["caption"])
        for key in ("text", "pooled"):
            if key in record:
                example[key] = np.asarray(record[key], np.float32)
        if "text_mask" in record:
            example["text_mask"] = np.asarray(record["text_mask"], bool)
        return example

    def __repr__(self) -> str:
        return f"ArrayRecordSource(root={str(self.root)!r}, n={len(self)}, kind={self.kind!r})"


# ------------------------------------------------------------------------------------------------------------------
# Conversion: planning


@dataclasses.dataclass(frozen=True)
class Item:
    """One example to convert: an image file (``path``) or an index into an in-memory source (``index``)."""

    key: str
    path: str | None = None
    index: int | None = None
    label: int = 0
    caption: str | None = None


@dataclasses.dataclass
class Plan:
    source: str
    items: list[Item]
    classes: list[str]
    has_captions: bool
    spec: str | None = None  # a load_source spec the workers reopen (in-memory / TFDS sources)
    spec_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _read_caption_table(path: pathlib.Path) -> list[tuple[str, str, int | None]]:
    """(relative path, caption, label or None) rows of a CSV (header with ``file``/``path``/``image`` and
    ``caption``/``text``, optional ``label``) or JSONL file (same keys)."""
    path_keys, caption_keys = ("file", "path", "image", "file_name"), ("caption", "text")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no} is not JSON ({err.msg})") from None
    out = []
    for row_no, row in enumerate(rows, 1):
        file_key = next((k for k in path_keys if k in row), None)
        caption_key = next((k for k in caption_keys if k in row), None)
        if file_key is None or caption_key is None:
            raise ValueError(f"{path} row {row_no} has keys {sorted(row)}; it needs one of {list(path_keys)} and "
                             f"one of {list(caption_keys)}")
        label = row.get("label")
        out.append((str(row[file_key]), str(row[caption_key]), None if label in (None, "") else int(label)))
    return out


def _is_image(path: pathlib.Path) -> bool:
    from flaxdiff.data.sources import IMAGE_EXTENSIONS

    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def plan_conversion(src: str, split: str = "train", data_dir: str | None = None) -> Plan:
    """What to convert: an image folder (class sub-folders, sidecar ``.txt`` captions, ``captions.jsonl`` /
    ``captions.csv``), a CSV / JSONL table of image paths and captions, or any other
    :func:`flaxdiff.data.load_source` spec (``.npz``, ``tfds:NAME``, ``mnist``, ``digits``)."""
    path = pathlib.Path(src).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
        rows = _read_caption_table(path)
        labels = [r[2] for r in rows if r[2] is not None]
        if any(label < 0 for label in labels):
            raise ValueError(f"{path}: label {min(labels)} is negative; labels are class indices 0..K-1")
        classes = [str(c) for c in range(max(labels) + 1)] if labels else []
        items = [Item(key=rel, path=str(path.parent / rel), label=lab or 0, caption=cap) for rel, cap, lab in rows]
        return Plan(str(path.absolute()), items, classes, True)
    if path.is_dir():
        class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: list[tuple[pathlib.Path, int]] = []
        for label, class_dir in enumerate(class_dirs):
            files += [(p, label) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        files += [(p, 0) for p in sorted(path.iterdir()) if _is_image(p)]
        if not files:
            from flaxdiff.data.sources import IMAGE_EXTENSIONS

            raise ValueError(f"image folder {str(path)!r} contains no image files (extensions {IMAGE_EXTENSIONS})")
        table: dict[str, str] = {}
        for name in ("captions.jsonl", "captions.csv"):
            if (path / name).is_file():
                table.update({str((path / rel).absolute()): cap for rel, cap, _ in _read_caption_table(path / name)})
        items = []
        for file, label in files:
            sidecar = file.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else table.get(
                str(file.absolute()))
            items.append(Item(key=str(file.relative_to(path)), path=str(file), label=label, caption=caption))
        has_captions = any(item.caption is not None for item in items)
        if has_captions:
            items = [dataclasses.replace(item, caption=item.caption or "") for item in items]
        return Plan(str(path.absolute()), items, [p.name for p in class_dirs], has_captions)
    from flaxdiff.data.sources import load_source

    options: dict[str, Any] = {"split": split}
    if src.startswith("tfds:"):
        options["data_dir"] = data_dir
    source = load_source(src, **options)
    has_captions = getattr(source, "captions", None) is not None
    num_classes = int(getattr(source, "num_classes", 0) or 0)
    items = [Item(key=str(i), index=i) for i in range(len(source))]
    return Plan(src if not path.exists() else str(path.absolute()), items, [str(c) for c in range(num_classes)],
                has_captions, spec=src if not path.exists() else str(path.absolute()), spec_options=options)


def _fingerprint(plan: Plan, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for item in plan.items:
        digest.update(f"{item.key}\0{item.label}\0{item.caption}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------------
# Conversion: workers


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    out_dir: str
    index: int
    count: int
    items: tuple[Item, ...]
    spec: str | None
    spec_options: dict[str, Any]
    has_captions: bool
    resolution: int | None
    image_format: str


_OPENED_SOURCES: dict[str, Any] = {}


def _open_source(spec: str, options: dict[str, Any]) -> Any:
    key = json.dumps([spec, options], sort_keys=True, default=str)
    if key not in _OPENED_SOURCES:
        from flaxdiff.data.sources import load_source

        _OPENED_SOURCES[key] = load_source(spec, **options)
    return _OPENED_SOURCES[key]


def _prepare_image(image: np.ndarray, resolution: int | None) -> np.ndarray:
    from flaxdiff.data.sources import _as_hwc
    from flaxdiff.data.transforms import resize_and_crop

    image = _as_hwc(np.asarray(image))
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if resolution is not None:
        image = resize_and_crop(image, resolution)
    return np.ascontiguousarray(image)


def _read_item(task: _ShardTask, item: Item) -> dict[str, Any]:
    if item.path is not None:
        from flaxdiff.data.sources import _load_image

        image = _load_image(pathlib.Path(item.path))
        label, caption = item.label, item.caption
    else:
        example = _open_source(task.spec, task.spec_options)[item.index]
        image, label, caption = example["image"], int(example["label"]), example.get("caption")
    record: dict[str, Any] = {"id": item.key, "label": int(label)}
    image = _prepare_image(image, task.resolution)
    record["image"] = _png_bytes(image) if task.image_format == "png" else image
    if task.has_captions:
        record["caption"] = "" if caption is None else str(caption)
    return record


def _write_shard(task: _ShardTask) -> dict[str, Any]:
    """Write one shard to a temporary name and rename it when complete; returns its summary."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = pathlib.Path(task.out_dir) / shard_name(task.index, task.count)
    partial = final.with_suffix(".array_record.partial")
    skipped: list[dict[str, str]] = []
    shapes: set[tuple[int, ...]] = set()
    written = 0
    writer = ArrayRecordWriter(str(partial), WRITER_OPTIONS)
    try:
        for item in task.items:
            try:
                record = _read_item(task, item)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                skipped.append({"file": item.key, "error": f"{type(err).__name__}: {err}"})
                continue
            image = record["image"]
            shapes.add(tuple(_png_decode(image).shape) if isinstance(image, bytes) else tuple(image.shape))
            writer.write(encode_record(record))
            written += 1
    finally:
        writer.close()
    summary = {"file": final.name, "count": written, "skipped": skipped,
               "shapes": sorted([list(s) for s in shapes])}
    partial.with_suffix(".json").write_text(json.dumps(summary))
    os.replace(partial.with_suffix(".json"), final.with_suffix(".json"))
    os.replace(partial, final)
    return summary


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="shard", disable=not enabled)


def _run_tasks(tasks: Sequence[_ShardTask], workers: int, progress: bool, desc: str,
               fn: Callable[[_ShardTask], dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    bar = _progress(len(tasks), desc, progress)
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(fn(task))
            bar.update(1)
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for summary in pool.imap_unordered(fn, tasks):
                results.append(summary)
                bar.update(1)
    bar.close()
    return results


def _shard_summary(out_dir: pathlib.Path, name: str) -> dict[str, Any]:
    return json.loads((out_dir / name).with_suffix(".json").read_text())


def _finish_manifest(out_dir: pathlib.Path, names: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
    summaries = [_shard_summary(out_dir, name) for name in names]
    shapes = {tuple(s) for summary in summaries for s in summary["shapes"]}
    skipped = [entry for summary in summaries for entry in summary["skipped"]]
    manifest = {"format": FORMAT, "version": VERSION,
                "count": int(sum(s["count"] for s in summaries)),
                "shards": [{"file": s["file"], "count": s["count"]} for s in summaries],
                "image_shape": list(shapes.pop()) if len(shapes) == 1 else None,
                "skipped": len(skipped), "skipped_files": skipped, **extra}
    if manifest["count"] == 0:
        raise ValueError(f"nothing was written to {out_dir}: all {len(skipped)} inputs failed "
                         f"(first: {skipped[0] if skipped else 'none'})")
    tmp = out_dir / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    for entry in skipped:
        logger.warning("skipped %s (%s)", entry["file"], entry["error"])
    return manifest


def _check_plan(out_dir: pathlib.Path, fingerprint: str, overwrite: bool) -> None:
    """A re-run resumes only the same conversion; a different one needs ``overwrite``."""
    plan_file = out_dir / PLAN
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        if not overwrite:
            raise ValueError(f"{out_dir} holds a different conversion (other source or settings); pass "
                             f"overwrite=True (--overwrite) to replace it")
        for stale in list(out_dir.glob("data-*")) + [out_dir / MANIFEST]:
            if stale.is_file():
                stale.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def _num_shards(count: int, records_per_shard: int, num_shards: int | None) -> int:
    if num_shards is not None:
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards} must be >= 1")
        return min(num_shards, count)
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard={records_per_shard} must be >= 1")
    return max(1, math.ceil(count / records_per_shard))


def _split(count: int, shards: int) -> list[range]:
    """Contiguous, near-equal ranges: shard i gets [floor(i N / S), floor((i + 1) N / S))."""
    bounds = [i * count // shards for i in range(shards + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(shards)]


def convert(src: str, out_dir: str | os.PathLike, *, resolution: int | None = None, image_format: str = "raw",
            records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, num_shards: int | None = None,
            workers: int | None = None, split: str = "train", data_dir: str | None = None,
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert ``src`` (see :func:`plan_conversion`) into ArrayRecord shards + ``manifest.json`` in ``out_dir``.

    resolution: resize (aspect kept) and centre-crop every image to ``resolution`` squared; None keeps the sizes.
    image_format: "raw" (uint8 arrays: fastest to read) or "png" (smaller files).
    workers: processes (default: the CPU count); each writes whole shards. A re-run of the same conversion skips
    shards already finished (written under a temporary name, renamed when complete). Files that cannot be decoded
    are skipped, counted and named in the manifest. Returns the manifest.
    """
    if image_format not in IMAGE_ENCODINGS:
        raise ValueError(f"image_format={image_format!r}; accepted: {', '.join(IMAGE_ENCODINGS)}")
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution={resolution} must be >= 1 or None")
    out = pathlib.Path(out_dir).expanduser().absolute()
    plan = plan_conversion(src, split=split, data_dir=data_dir)
    shards = _num_shards(len(plan.items), records_per_shard, num_shards)
    settings = {"resolution": resolution, "image_format": image_format, "shards": shards, "source": plan.source}
    _check_plan(out, _fingerprint(plan, settings), overwrite)
    names = [shard_name(i, shards) for i in range(shards)]
    tasks = [_ShardTask(str(out), i, shards, tuple(plan.items[r.start:r.stop]), plan.spec, plan.spec_options,
                        plan.has_captions, resolution, image_format)
             for i, r in enumerate(_split(len(plan.items), shards)) if not (out / names[i]).is_file()]
    if len(tasks) < shards:
        logger.info("resuming: %d of %d shards already written in %s", shards - len(tasks), shards, out)
    _run_tasks(tasks, workers if workers is not None else (os.cpu_count() or 1), progress, "convert", _write_shard)
    return _finish_manifest(out, names, {
        "kind": "pixels", "image_encoding": image_format, "resolution": resolution, "classes": plan.classes,
        "num_classes": len(plan.classes), "caption_field": "caption" if plan.has_captions else None,
        "source": plan.source})


# ------------------------------------------------------------------------------------------------------------------
# Encoding: precomputed latents and text embeddings


def _batched(indices: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def encode(src: str | os.PathLike, out_dir: str | os.PathLike, *, autoencoder: str | None = None,
           text_encoder: str | None = None, image_size: int | None = None, batch_size: int = 64,
           records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, num_shards: int | None = None,
           text_dtype: str = "float16", seed: int = 0, overwrite: bool = False, progress: bool = True
           ) -> dict[str, Any]:
    """Precompute once, train many times: write the scaled VAE latents of every image of ``src`` (a converted
    directory or any ``load_source`` spec) and, for captioned data with ``text_encoder``, the frozen encoder's
    embeddings, into ArrayRecord shards readable by :class:`ArrayRecordSource` (schema in the module docstring).

    autoencoder: any directory :func:`flaxdiff.latents.load_codec` reads (diffusers VAE, flaxdiff export or
    checkpoint); latents = ``scale_latents(config, posterior mean)``. None keeps pixels (text embeddings only).
    text_encoder: a :meth:`flaxdiff.data.captions.TextConditioner.create` spec; it is exported to
    ``out_dir/text_encoder`` so training and sampling use the very same weights.
    image_size: the pixel resolution fed to the autoencoder (resize + centre crop); default the stored size.
    Resumable like :func:`convert` (finished shards are kept). Returns the manifest.
    """
    import jax.numpy as jnp

    from flaxdiff.data import transforms as T
    from flaxdiff.data.sources import load_source

    if autoencoder is None and text_encoder is None:
        raise ValueError("encode needs autoencoder=DIR and/or text_encoder=SPEC; got neither")
    if text_dtype not in ("float16", "float32"):
        raise ValueError(f"text_dtype={text_dtype!r}; accepted: float16, float32")
    out = pathlib.Path(out_dir).expanduser().absolute()
    src_path = pathlib.Path(str(src)).expanduser()
    source = ArrayRecordSource(src_path) if is_converted_dir(src_path) else load_source(str(src))
    if len(source) == 0:
        raise ValueError(f"{src} is empty")
    captions = getattr(source, "captions", None)
    if text_encoder is not None and captions is None:
        raise ValueError(f"text_encoder={text_encoder!r} needs captions but {src} has none")
    codec = None
    if autoencoder is not None:
        from flaxdiff.latents import load_codec

        codec = load_codec(autoencoder)
    if image_size is None and codec is not None and len({tuple(np.shape(source[i]["image"]))
                                                        for i in range(min(len(source), 8))}) > 1:
        raise ValueError(f"{src} has images of several sizes; pass image_size=N (--image-size)")
    channels = codec.config.in_channels if codec is not None else None
    ops: list[Any] = []
    if image_size is not None:
        ops.append(T.ResizeCrop(image_size))
    if channels is not None:
        ops.append(T.ToChannels(channels))
    ops.append(T.ScaleToSymmetric())

    def prepare(example: dict[str, Any]) -> dict[str, Any]:
        for op in ops:
            example = op.random_map(example, None) if isinstance(op, T.ResizeCrop) else op.map(example)
        return example

    text = None
    if text_encoder is not None:
        from flaxdiff.data.captions import TextConditioner

        text = TextConditioner.create(text_encoder, seed=seed)
    shards = _num_shards(len(source), records_per_shard, num_shards)
    settings = {"src": str(src), "autoencoder": codec.path if codec else None, "text_encoder": text_encoder,
                "image_size": image_size, "shards": shards, "text_dtype": text_dtype, "seed": seed,
                "count": len(source)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    _check_plan(out, digest, overwrite)
    text_info = None
    if text is not None:
        text.save(out / "text_encoder")
        text_info = {"spec": text_encoder, "path": "text_encoder", "max_len": text.max_len, "width": text.width}
    names = [shard_name(i, shards) for i in range(shards)]
    todo = [(i, r) for i, r in enumerate(_split(len(source), shards)) if not (out / names[i]).is_file()]
    from array_record.python.array_record_module import ArrayRecordWriter

    bar = _progress(len(todo), "encode", progress)
    pixel_shape = None
    for shard_index, index_range in todo:
        final = out / names[shard_index]
        partial = final.with_suffix(".array_record.partial")
        writer = ArrayRecordWriter(str(partial), WRITER_OPTIONS)
        shapes: set[tuple[int, ...]] = set()
        try:
            for chunk in _batched(list(index_range), batch_size):
                raw = [source.record(i) if isinstance(source, ArrayRecordSource) else None for i in chunk]
                examples = [prepare(source[i]) for i in chunk]
                images = np.stack([e["image"] for e in examples])
                pixel_shape = list(images.shape[1:])
                if codec is not None:
                    values = np.asarray(codec.encode(jnp.asarray(images)), np.float32)
                else:
                    values = np.stack([source[i]["image"] for i in chunk])
                cond = None
                if text is not None:
                    cond = {k: np.asarray(v) for k, v in text.encode([e["caption"] for e in examples]).items()}
                for row, i in enumerate(chunk):
                    record: dict[str, Any] = {"id": raw[row]["id"] if raw[row] and "id" in raw[row] else str(i),
                                              "label": int(examples[row]["label"]), "image": values[row]}
                    if "caption" in examples[row]:
                        record["caption"] = str(examples[row]["caption"])
                    if cond is not None:
                        record["text"] = cond["text"][row].astype(text_dtype)
                        record["text_mask"] = cond["text_mask"][row].astype(bool)
                        record["pooled"] = cond["pooled"][row].astype(text_dtype)
                    shapes.add(tuple(np.shape(values[row])))
                    writer.write(encode_record(record))
        finally:
            writer.close()
        summary = {"file": final.name, "count": len(index_range), "skipped": [],
                   "shapes": sorted([list(s) for s in shapes]), "pixel_shape": pixel_shape}
        final.with_suffix(".json").write_text(json.dumps(summary))
        os.replace(partial, final)
        bar.update(1)
    bar.close()
    if pixel_shape is None:
        pixel_shape = _shard_summary(out, names[0]).get("pixel_shape")
    ae_info = None
    if codec is not None:
        config = codec.config
        ae_info = {"path": codec.path, "relative_path": os.path.relpath(codec.path, out),
                   "scaling_factor": float(config.scaling_factor),
                   "shift_factor": None if config.shift_factor is None else float(config.shift_factor),
                   "latent_channels": int(config.latent_channels),
                   "downsample_factor": int(config.downsample_factor)}
    src_manifest = read_manifest(src_path) if is_converted_dir(src_path) else {}
    manifest = _finish_manifest(out, names, {
        "kind": "latents" if codec is not None else "pixels",
        "image_encoding": "float32" if codec is not None else "raw",
        "resolution": image_size if image_size is not None else src_manifest.get("resolution"),
        "classes": list(src_manifest.get("classes") or [str(c) for c in range(
            int(getattr(source, "num_classes", 0) or 0))]),
        "num_classes": int(getattr(source, "num_classes", 0) or 0),
        "caption_field": "caption" if captions is not None else None,
        "source": str(src), "pixel_shape": pixel_shape,
        "latent_shape": None if codec is None else list(codec.latent_shape(tuple(pixel_shape))),
        "autoencoder": ae_info, "text_encoder": text_info, "text_dtype": text_dtype if text is not None else None})
    return manifest
