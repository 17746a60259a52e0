"""Data for flaxdiff: random-access sources, per-example transforms and the grain loader.

    from flaxdiff import data
    source = data.load_source("mnist", split="train")
    it = data.make_loader(source, batch_size_per_process=64, image_size=32, seed=0)
    batch = next(it)           # {"image": (64, 32, 32, 1) float32 in [-1, 1], "label": (64,) int32}
    state = it.get_state()     # checkpoint the position; it.set_state(state) resumes
"""
from flaxdiff.data.checks import check_finite
from flaxdiff.data.arrayrecord import ArrayRecordSource, is_converted_dir, read_manifest
from flaxdiff.data.pipeline import make_loader, read_options, shard_options
from flaxdiff.data.sources import (
    SPLIT_SEED,
    VALIDATION_FRACTION,
    ArraySource,
    ImageFolderSource,
    TFDSSource,
    digits_source,
    load_source,
    mnist_source,
    npz_source,
)
from flaxdiff.data.transforms import (
    RandomFlip,
    ResizeCrop,
    ScaleToSymmetric,
    TokenizeCaption,
    ToChannels,
    image_transforms,
    resize_and_crop,
)

__all__ = [
    "ArrayRecordSource", "is_converted_dir", "read_manifest",
    "SPLIT_SEED", "VALIDATION_FRACTION", "ArraySource", "ImageFolderSource", "TFDSSource",
    "check_finite", "digits_source", "load_source", "mnist_source", "npz_source", "make_loader", "read_options",
    "shard_options",
    "RandomFlip", "ResizeCrop", "ScaleToSymmetric", "TokenizeCaption", "ToChannels",
    "image_transforms", "resize_and_crop",
]
