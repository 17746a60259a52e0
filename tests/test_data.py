"""Tests for flaxdiff.data: sources, transforms, grain loader, shards and resume."""
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from flaxdiff import data

TINY_SHAPE = (12, 10, 1)


class FlaxdiffTinyShapes(tfds.core.GeneratorBasedBuilder):
    """20 examples: image i is constant 10*i, label i % 4 (Tensor features, no TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=TINY_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["a", "b", "c", "d"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full(TINY_SHAPE, 10 * i, np.uint8), "label": i % 4}


def _collect(it):
    batches = list(it)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _check_batch(batch, batch_size, size, channels, num_classes):
    assert batch["image"].shape == (batch_size, size, size, channels)
    assert batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.9 and batch["image"].max() > 0.5
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == np.int32
    assert set(batch["label"].tolist()) <= set(range(num_classes))


def test_mnist_source_split_and_batches():
    train, val = data.mnist_source("train"), data.mnist_source("validation")
    assert (len(train), len(val)) == (4500, 500)
    assert train[0]["image"].shape == (28, 28, 1) and train[0]["image"].dtype == np.uint8
    key = lambda src: {src.images[i].tobytes() + bytes([src.labels[i]]) for i in range(len(src))}
    assert not key(train) & key(val)
    assert len(key(train) | key(val)) == len(key(data.mnist_source("all")))
    # the file is sorted by class: the seeded shuffle must put every class in both splits
    assert np.bincount(val.labels).min() >= 30 and np.bincount(train.labels).min() >= 400
    np.testing.assert_array_equal(data.mnist_source("validation").labels, val.labels)
    batch = next(data.make_loader(train, 32, 32, seed=0))
    _check_batch(batch, 32, 32, 1, 10)
    assert len(set(batch["label"].tolist())) >= 5


def test_digits_source_scale_and_split():
    from sklearn.datasets import load_digits

    raw = load_digits()
    src = data.digits_source("all")
    assert len(src) == 1797 and len(data.digits_source("validation")) == 180
    batch = next(data.make_loader(src, 16, None, seed=0, shuffle=False))
    _check_batch(batch, 16, 8, 1, 10)
    perm = np.random.default_rng(data.SPLIT_SEED).permutation(1797)[:16]
    # v in 0..16 -> v / 16 in [0, 1] -> 2 x - 1 = v / 8 - 1
    np.testing.assert_allclose(batch["image"][..., 0], raw.images[perm] / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], raw.target[perm])
    _check_batch(next(data.make_loader(data.digits_source(), 8, 32, seed=1)), 8, 32, 1, 10)


def test_array_and_npz_sources(tmp_path):
    images = np.linspace(-2.0, 2.0, 6 * 4 * 4).reshape(6, 4, 4).astype(np.float32)
    src = data.ArraySource(images, [0, 1, 2, 0, 1, 2], value_range=(-2.0, 2.0))
    batch = next(data.make_loader(src, 6, None, shuffle=False, num_epochs=1))
    np.testing.assert_allclose(batch["image"][..., 0], images / 2.0, atol=1e-6)  # (x+2)/4*2-1
    path = tmp_path / "arrays.npz"
    np.savez(path, images=(np.arange(5 * 6 * 6 * 3) % 256).astype(np.uint8).reshape(5, 6, 6, 3),
             labels=np.arange(5), captions=np.array([f"cap {i}" for i in range(5)]))
    batch = next(data.make_loader(data.load_source(str(path)), 5, 4, shuffle=False, channels=1))
    assert batch["image"].shape == (5, 4, 4, 1)
    assert batch["caption"].tolist() == [f"cap {i}" for i in range(5)]
    np.testing.assert_array_equal(batch["label"], np.arange(5))
    with pytest.raises(ValueError, match="missing.npz"):
        data.load_source(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="non-empty"):
        data.ArraySource(np.zeros((0, 4, 4), np.uint8))


def _write_png(path, value, size=(12, 8), mode="L"):
    Image.new(mode, size, value).save(path)


def test_image_folder_labels_captions_corrupt(tmp_path, caplog):
    root = tmp_path / "imgs"
    for name in ("zebra", "apple"):
        (root / name).mkdir(parents=True)
    _write_png(root / "apple" / "a0.png", 0)
    _write_png(root / "apple" / "a1.png", 255)
    _write_png(root / "zebra" / "z0.png", (255, 0, 0), mode="RGB")
    (root / "apple" / "a0.txt").write_text("a black square\n")
    (root / "captions.jsonl").write_text(json.dumps({"file": "zebra/z0.png", "caption": "red"}) + "\n")
    (root / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = root / "zebra" / "z1.png"
    _write_png(good, 128)
    truncated = root / "zebra" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="flaxdiff.data.sources"):
        src = data.ImageFolderSource(root)
    assert src.class_names == ["apple", "zebra"]
    assert src.num_skipped == 2
    for bad in ("broken.png", "truncated.png"):
        assert any(bad in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert "Skipped 2 corrupt image file(s)" in caplog.text
    out = _collect(data.make_loader(src, 2, 8, shuffle=False, num_epochs=1, drop_remainder=False,
                                    channels=3))
    assert out["image"].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(out["label"], [0, 0, 1, 1])
    assert out["caption"].tolist() == ["a black square", "", "red", ""]
    np.testing.assert_allclose(out["image"][0], -1.0)
    np.testing.assert_allclose(out["image"][2], np.broadcast_to([1.0, -1.0, -1.0], (8, 8, 3)))
    assert data.ImageFolderSource(root, captions=False).captions is None


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty.*contains no readable images"):
        data.load_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="nowhere_dataset"):
        data.load_source("nowhere_dataset")
    with pytest.raises(ValueError, match="split='test'"):
        data.mnist_source("test")


def test_resize_crop_and_flip_closed_forms():
    image = np.arange(10 * 20, dtype=np.uint8).reshape(10, 20, 1)
    np.testing.assert_array_equal(data.resize_and_crop(image, 10), image[:, 5:15])
    rng = np.random.default_rng(0)
    crops = {data.resize_and_crop(image, 10, rng)[0, 0, 0] for _ in range(50)}
    assert crops <= set(range(11)) and len(crops) > 3
    tall = np.zeros((40, 20, 3), np.uint8)
    assert data.resize_and_crop(tall, (8, 6)).shape == (8, 6, 3)
    flip = data.RandomFlip(1.0).random_map({"image": image}, rng)["image"]
    np.testing.assert_array_equal(flip, image[:, ::-1])
    rgb = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)
    np.testing.assert_array_equal(data.ToChannels(1).map({"image": rgb})["image"][..., 0], [[76, 150]])
    gray = data.ToChannels(3).map({"image": image})["image"]
    assert gray.shape == (10, 20, 3) and (gray == image).all()
    with pytest.raises(ValueError, match="channels=2"):
        data.ToChannels(2)


def test_tokenizer_hook_and_bad_arguments():
    src = data.ArraySource(np.zeros((4, 8, 8), np.uint8), captions=["a", "bb", "ccc", "dddd"])
    batch = next(data.make_loader(src, 4, 8, shuffle=False,
                                  tokenizer=lambda s: np.array([len(s), 0, 0], np.int32)))
    np.testing.assert_array_equal(batch["tokens"][:, 0], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="batch_size_per_process=0"):
        data.make_loader(src, 0, 8)
    with pytest.raises(ValueError, match="shard_index=1, shard_count=None"):
        data.make_loader(src, 2, 8, shard_index=1)


def test_tfds_source(tmp_path):
    FlaxdiffTinyShapes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = data.load_source("tfds:flaxdiff_tiny_shapes", data_dir=tmp_path)
    assert len(src) == 20 and src.num_classes == 4
    example = src[3]
    assert example["image"].shape == TINY_SHAPE and example["label"] == (example["image"][0, 0, 0] // 10) % 4
    out = _collect(data.make_loader(src, 5, 6, seed=3, num_epochs=1, random_flip=True))
    assert out["image"].shape == (20, 6, 6, 1)
    values = np.round((out["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert sorted(values.tolist()) == [10 * i for i in range(20)]
    np.testing.assert_array_equal(out["label"], (values // 10) % 4)
    assert len(data.TFDSSource("flaxdiff_tiny_shapes", split="test", data_dir=tmp_path)) == 4
    with pytest.raises(ValueError, match="'flaxdiff_tiny_shapes' is not prepared"):
        data.TFDSSource("flaxdiff_tiny_shapes", data_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.TFDSSource("flaxdiff_tiny_shapes", split="validation", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'no_such_dataset_xyz' is not a known dataset"):
        data.TFDSSource("no_such_dataset_xyz", data_dir=tmp_path)


def test_two_shards_are_disjoint_and_cover():
    src = data.ArraySource(np.arange(30, dtype=np.uint8).reshape(30, 1, 1), np.arange(30) % 10)
    seen = []
    for shard in (0, 1):
        out = _collect(data.make_loader(src, 4, None, seed=7, num_epochs=1, shard_index=shard,
                                        shard_count=2, drop_remainder=False))
        seen.append(set(np.round((out["image"][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()))
        assert len(out["label"]) == 15
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(30))
    by_process = _collect(data.make_loader(src, 4, None, num_epochs=1, drop_remainder=False))
    assert len(by_process["label"]) == 30  # ShardByJaxProcess: one process reads everything


def test_worker_processes_cover_one_epoch():
    src = data.ArraySource(np.arange(24, dtype=np.uint8).reshape(24, 1, 1))
    out = _collect(data.make_loader(src, 4, None, seed=1, num_epochs=1, worker_count=2))
    values = np.round((out["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert sorted(values.tolist()) == list(range(24))


def test_state_resume_gives_identical_batches(tmp_path):
    import orbax.checkpoint as ocp
    from grain import python as grain_python

    src = data.digits_source("train")
    make = lambda: data.make_loader(src, 8, 10, seed=5, random_crop=True, random_flip=True)
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    ckpt = ocp.Checkpointer(grain_python.PyGrainCheckpointHandler())
    ckpt.save(tmp_path / "data_state", args=grain_python.PyGrainCheckpointSave(it))
    expected = [next(it) for _ in range(4)]
    fresh = make()
    fresh.set_state(state)
    restored = make()
    ckpt.restore(tmp_path / "data_state", args=grain_python.PyGrainCheckpointRestore(restored))
    for resumed in (fresh, restored):
        for want in expected:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    assert not np.array_equal(next(make())["image"], expected[0]["image"])


def test_reader_threads_by_source_and_the_same_batches_either_way(tmp_path):
    src = data.digits_source("train")
    assert data.read_options(src).num_threads == 0   # in memory: read in the loader's thread
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    folder = data.ImageFolderSource(tmp_path)
    assert data.read_options(folder).num_threads == 16   # file-backed: grain's reader threads
    assert data.read_options(src, 3).num_threads == 3
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match=rf"read_threads={bad!r} must be an int >= 0 or None"):
            data.read_options(src, bad)
    make = lambda threads: data.make_loader(src, 8, 10, seed=5, random_crop=True, random_flip=True,
                                            read_threads=threads)
    threaded, unthreaded = make(4), make(None)
    for _ in range(3):
        a, b = next(threaded), next(unthreaded)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed = make(None)
    resumed.set_state(threaded.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], next(threaded)["image"])
