"""ArrayRecord datasets: a folder of captioned images converts (bad files skipped and named, records equal to the
decoded files), resumes, reads back through load_source / make_loader / training.py; latents and text embeddings are
precomputed exactly; two JAX processes on localhost read disjoint shares; the CLI reports bad input in one line."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flaxdiff import data, interop, latents, models
from flaxdiff.data import arrayrecord, commands
from flaxdiff.data.captions import TextConditioner

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog")
PER_CLASS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cat/ and dog/ with 6 RGB 12x10 PNGs each and a sidecar caption per image, plus one corrupt file."""
    root = tmp_path_factory.mktemp("images") / "src"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(f"a {name} number {i}\n")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n this is not an image")
    return root


@pytest.fixture(scope="module")
def converted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "shards"
    manifest = arrayrecord.convert(str(folder), out, records_per_shard=5, workers=1, progress=False)
    return out, manifest


def test_folder_with_captions_converts_exactly_and_names_bad_files(folder, converted):
    out, manifest = converted
    assert manifest["count"] == 2 * PER_CLASS and manifest["skipped"] == 1
    assert manifest["skipped_files"][0]["file"] == os.path.join("cat", "broken.png")
    assert "UnidentifiedImageError" in manifest["skipped_files"][0]["error"]
    assert [s["count"] for s in manifest["shards"]] == [4, 3, 5]  # 13 inputs split 4/4/5; cat/broken.png is #6
    assert manifest["classes"] == list(CLASSES) and manifest["num_classes"] == 2
    assert manifest["caption_field"] == "caption" and manifest["image_shape"] == [12, 10, 3]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    source = data.load_source(str(out))
    assert isinstance(source, arrayrecord.ArrayRecordSource) and len(source) == 12
    seen = set()
    for i in range(len(source)):
        example, record = source[i], source.record(i)
        name, file = record["id"].split(os.sep)
        expected = np.asarray(Image.open(folder / name / file))
        np.testing.assert_array_equal(example["image"], expected)
        assert example["image"].dtype == np.uint8 and example["label"] == CLASSES.index(name)
        assert example["caption"] == f"a {name} number {Path(file).stem}"
        seen.add(record["id"])
    assert len(seen) == 12
    assert list(source.captions)[:2] == ["a cat number 0", "a cat number 1"]
    batch = next(data.make_loader(source, 4, 8, shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    assert list(batch["caption"]) == [f"a cat number {i}" for i in range(4)]


def test_caption_table_and_png_format(folder, tmp_path):
    rows = [{"file": f"{name}/{i}.png", "text": f"row {name} {i}", "label": label}
            for label, name in enumerate(CLASSES) for i in range(2)]
    rows.append({"file": "dog/missing.png", "text": "gone", "label": 1})
    table = folder / "table.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = arrayrecord.convert(str(table), tmp_path / "png", image_format="png", resolution=8, workers=1,
                                   progress=False)
    assert manifest["count"] == 4 and manifest["skipped_files"][0]["file"] == "dog/missing.png"
    assert manifest["image_shape"] == [8, 8, 3] and manifest["image_encoding"] == "png"
    source = data.load_source(str(tmp_path / "png"))
    assert isinstance(source.record(0)["image"], bytes)
    expected = data.resize_and_crop(np.asarray(Image.open(folder / "cat" / "0.png")), 8)
    np.testing.assert_array_equal(source[0]["image"], expected)
    assert [source[i]["caption"] for i in range(4)] == [r["text"] for r in rows[:4]]
    assert [int(source[i]["label"]) for i in range(4)] == [0, 0, 1, 1]
    bad = folder / "bad.csv"
    bad.write_text("path,description\nx.png,y\n")
    with pytest.raises(ValueError, match="row 1 has keys .* needs one of"):
        arrayrecord.convert(str(bad), tmp_path / "bad", workers=1, progress=False)


def test_conversion_resumes_in_parallel_and_refuses_a_different_one(folder, converted, tmp_path):
    out = tmp_path / "resume"
    first = arrayrecord.convert(str(folder), out, records_per_shard=5, workers=2, progress=False)
    shards = sorted(out.glob("data-*.array_record"))
    reference, _ = converted
    for ours, theirs in zip(shards, sorted(reference.glob("data-*.array_record"))):
        assert ours.read_bytes() == theirs.read_bytes()  # workers=2 writes what workers=1 writes
    # an interrupted run: the last shard never finished (a partial file), the manifest was never written
    shards[-1].rename(shards[-1].with_suffix(".array_record.partial"))
    (out / "manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    resumed = arrayrecord.convert(str(folder), out, records_per_shard=5, workers=1, progress=False)
    assert resumed == first
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept  # finished shards were not rewritten
    assert shards[-1].is_file() and len(data.load_source(str(out))) == 12
    with pytest.raises(ValueError, match="holds a different conversion .*--overwrite"):
        arrayrecord.convert(str(folder), out, records_per_shard=3, workers=1, progress=False)
    again = arrayrecord.convert(str(folder), out, records_per_shard=3, workers=1, overwrite=True, progress=False)
    assert len(again["shards"]) == 5 and len(list(out.glob("data-*.array_record"))) == 5


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A tiny randomly initialised KL autoencoder (f2, 2 latent channels, scaling 0.7) exported like a trained one."""
    config = models.get_config("autoencoder-tiny", block_out_channels=(8, 8), norm_num_groups=4, latent_channels=2,
                               in_channels=3, out_channels=3, scaling_factor=0.7)
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(
        lambda: config.make().init({"params": key, "sample": key}, jnp.zeros((1, 8, 8, 3)))["params"])
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # random weights without compiling init: N(0, 1 / fan_in) kernels, unit norm scales
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            return np.ones(leaf.shape, np.float32)
        if "bias" in name:
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return interop.export_params(jax.device_get(params), config, tmp_path_factory.mktemp("ae") / "vae")


def test_encode_precomputes_scaled_latents_and_text_embeddings(converted, autoencoder, tmp_path):
    src, _ = converted
    out = tmp_path / "encoded"
    manifest = arrayrecord.encode(src, out, autoencoder=str(autoencoder), text_encoder="text_encoder-tiny",
                                  image_size=8, batch_size=5, records_per_shard=8, progress=False)
    codec = latents.load_codec(autoencoder)
    assert manifest["kind"] == "latents" and manifest["count"] == 12
    assert manifest["latent_shape"] == [4, 4, 2] and manifest["image_shape"] == [4, 4, 2]
    assert manifest["pixel_shape"] == [8, 8, 3]
    assert manifest["autoencoder"]["scaling_factor"] == 0.7 and manifest["autoencoder"]["path"] == codec.path
    assert (out / manifest["autoencoder"]["relative_path"]).resolve() == Path(codec.path).resolve()
    assert manifest["text_encoder"]["path"] == "text_encoder" and manifest["classes"] == list(CLASSES)
    pixels_source = data.load_source(str(src))
    pixels = next(data.make_loader(pixels_source, 12, 8, shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
    want = np.asarray(codec.encode(jnp.asarray(pixels["image"])))
    encoded = data.load_source(str(out))
    batch = next(data.make_loader(encoded, 12, None, shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
    np.testing.assert_allclose(batch["image"], want, atol=1e-5)  # the loader hands back the scaled latent
    np.testing.assert_array_equal(batch["label"], pixels["label"])
    assert list(batch["caption"]) == list(pixels["caption"])
    # the exported encoder is the one that produced the embeddings (float16 storage)
    text = TextConditioner.create(str(out / "text_encoder"))
    cond = {k: np.asarray(v) for k, v in text.encode(list(pixels["caption"])).items()}
    np.testing.assert_allclose(batch["text"], cond["text"], atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(batch["pooled"], cond["pooled"], atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(batch["text_mask"], cond["text_mask"])
    assert batch["text"].dtype == np.float32 and encoded.record(0)["text"].dtype == np.float16
    # resumable: an encode interrupted before its last shard and manifest redoes only that shard, identically
    shards = sorted(out.glob("data-*.array_record"))
    finished = shards[-1].read_bytes()
    shards[-1].unlink()
    (out / "manifest.json").unlink()
    kept = shards[0].stat().st_mtime_ns
    again = arrayrecord.encode(src, out, autoencoder=str(autoencoder), text_encoder="text_encoder-tiny",
                               image_size=8, batch_size=5, records_per_shard=8, progress=False)
    assert again == manifest and shards[-1].read_bytes() == finished and shards[0].stat().st_mtime_ns == kept
    with pytest.raises(ValueError, match="needs captions but"):
        arrayrecord.encode("digits", tmp_path / "x", text_encoder="text_encoder-tiny", progress=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_read_disjoint_shares(converted, tmp_path):
    src, _ = converted
    code = ("import json, sys\nimport jax\n"
            "jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))\n"
            "from flaxdiff import data\n"
            "source = data.load_source(sys.argv[3])\n"
            "loader = data.make_loader(source, 2, None, shuffle=True, num_epochs=1, seed=0)\n"
            "seen = [str(c) for batch in loader for c in batch['caption']]\n"
            "json.dump({'process': jax.process_index(), 'captions': seen}, open(sys.argv[4], 'w'))\n")
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", code, address, str(i), str(src), str(tmp_path / f"{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-2000:]
    shares = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    assert [s["process"] for s in shares] == [0, 1]
    first, second = set(shares[0]["captions"]), set(shares[1]["captions"])
    assert len(shares[0]["captions"]) == len(shares[1]["captions"]) == 6  # 12 records, 6 per process
    assert not first & second
    everything = {data.load_source(str(src))[i]["caption"] for i in range(12)}
    assert first | second == everything


def test_cli_convert_info_and_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert commands.main(["convert", str(folder), str(out), "--workers", "1", "--no-progress",
                          "--num-shards", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 12 and result["shards"] == 2 and result["skipped"] == 1
    assert commands.main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == list(CLASSES)
    assert commands.main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a converted ArrayRecord directory" in err
    assert commands.main(["encode", str(out), str(tmp_path / "enc"), "--no-progress"]) == 2
    assert "needs autoencoder=DIR and/or text_encoder=SPEC" in capsys.readouterr().err


def test_training_script_trains_a_caption_model_on_a_converted_directory_and_resumes(folder, tmp_path):
    """training.py --dataset DIR --captions source; a run that lost its last checkpoint (preempted after step 2's)
    resumes from step 2 with the data position and redoes step 3 with the same loss."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import shutil

    import training

    workdir = tmp_path / "run"
    src = workdir / "data"  # inside the run directory (see the report: paths outside it with '..' do not resume)
    arrayrecord.convert(str(folder), src, records_per_shard=5, workers=1, progress=False)
    args = ["--dataset", str(src), "--captions", "source", "--image-size", "8", "--model", "unet-tiny",
            "--model-config", '{"channel_mult": [1]}', "--batch-size", "4", "--steps", "3", "--log-every", "1",
            "--preview-per-class", "0", "--checkpoint-every", "2", "--workdir", str(workdir)]
    assert training.main(args) == 0
    shutil.rmtree(workdir / "checkpoints" / "3")
    assert training.main([*args, "--resume"]) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [(line["step"], line["train/loss"]) for line in lines if "train/loss" in line]
    assert [step for step, _ in losses] == [1, 2, 3, 3]
    assert losses[3][1] == pytest.approx(losses[2][1], rel=1e-5)  # same batch (data position) and same key


def test_training_script_trains_on_precomputed_latents_and_embeddings(converted, autoencoder, tmp_path):
    """An encoded dataset (scaled VAE latents + frozen text embeddings) trains as it is: no resize, no re-encoding;
    the run records the dataset's autoencoder and text encoder, so the Pipeline decodes and takes prompts, and
    --resume accepts the same command."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import training
    from flaxdiff.pipeline import Pipeline

    src, _ = converted
    workdir = tmp_path / "run"
    encoded = workdir / "encoded"
    arrayrecord.encode(src, encoded, autoencoder=str(autoencoder), text_encoder="text_encoder-tiny", image_size=8,
                       batch_size=6, progress=False)
    args = ["--dataset", str(encoded), "--image-size", "8", "--model", "unet-tiny", "--model-config",
            '{"channel_mult": [1]}', "--batch-size", "4", "--steps", "2", "--log-every", "1",
            "--preview-per-class", "0", "--lr-decay", "constant", "--workdir", str(workdir)]
    assert training.main(args) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["captions"] == "source" and saved["data"]["latent_autoencoder"] is not None
    assert saved["model"]["options"]["in_channels"] == 2 and saved["data"]["num_classes"] == 0
    pipe = Pipeline.from_pretrained(workdir)
    assert pipe.sample_shape == (4, 4, 2) and pipe.image_shape == (8, 8, 3) and pipe.text is not None
    images = pipe.generate(prompts=["a cat", "a dog"], sampler="euler", steps=2)
    assert images.shape == (2, 8, 8, 3)
    assert training.main([*args[:-2], "--steps", "3", "--workdir", str(workdir), "--resume"]) == 0


def test_captions_in_the_data_are_ignored_without_captions(folder, tmp_path):
    """A captioned folder trained without --captions is class-conditional: the caption strings never reach a batch."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import training

    workdir = tmp_path / "run"
    assert training.main(["--dataset", str(folder), "--image-size", "8", "--model", "unet-tiny", "--model-config",
                          '{"channel_mult": [1]}', "--batch-size", "4", "--steps", "1", "--preview-per-class", "0", "--workdir",
                          str(workdir)]) == 0
    assert json.loads((workdir / "config.json").read_text())["data"]["captions"] is None
