"""Inception FID against pytorch-fid: the same randomly initialised FID Inception-v3 in torch (pytorch-fid's own
InceptionV3 wrapper and FIDInception* blocks) and in Flax (loaded from the torch state dict saved as a .pth and read
with weights_only=True) give the same pool features; our Fréchet distance equals pytorch-fid's; stats files
round-trip through pytorch-fid's loader; streaming statistics equal np.mean / np.cov.

pytorch-fid imports torchvision, which is not installable here: the few torchvision names it uses are stubbed in
sys.modules with torch-fidelity's torchvision-free copies of the same torch blocks (same submodule names, so
pytorch-fid's FIDInceptionA/C/E_1/E_2 subclasses build on them and run their own forward passes)."""
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff.metrics import fid, inception

torch = pytest.importorskip("torch")


def _load_torch_fidelity_inception() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3 without running torch_fidelity/__init__ (which imports
    torchvision): a bare parent package pointing at the installed directory."""
    spec = importlib.util.find_spec("torch_fidelity")
    root = Path(spec.origin).parent
    if "torch_fidelity" not in sys.modules or not hasattr(sys.modules["torch_fidelity"], "FeatureExtractorBase"):
        package = types.ModuleType("torch_fidelity")
        package.__path__ = [str(root)]
        sys.modules["torch_fidelity"] = package
    import torch_fidelity.feature_extractor_inceptionv3 as module

    return module


@pytest.fixture(scope="module")
def pytorch_fid():
    """pytorch_fid.inception and fid_score importable with a stub torchvision."""
    tf_inc = _load_torch_fidelity_inception()
    saved = {name: sys.modules.get(name) for name in
             ("torchvision", "torchvision.models", "torchvision.models.inception", "torchvision.transforms")}

    built = []

    def inception_v3(num_classes=1000, aux_logits=False, weights=None, init_weights=False):
        net = torch.nn.Module()
        built.append(net)
        blocks = [("Conv2d_1a_3x3", tf_inc.BasicConv2d(3, 32, kernel_size=3, stride=2)),
                  ("Conv2d_2a_3x3", tf_inc.BasicConv2d(32, 32, kernel_size=3)),
                  ("Conv2d_2b_3x3", tf_inc.BasicConv2d(32, 64, kernel_size=3, padding=1)),
                  ("Conv2d_3b_1x1", tf_inc.BasicConv2d(64, 80, kernel_size=1)),
                  ("Conv2d_4a_3x3", tf_inc.BasicConv2d(80, 192, kernel_size=3)),
                  ("Mixed_6a", tf_inc.InceptionB(288)), ("Mixed_7a", tf_inc.InceptionD(768)),
                  ("fc", torch.nn.Linear(2048, num_classes))]
        for name, block in blocks:
            setattr(net, name, block)
        return net

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.20.0"
    models = types.ModuleType("torchvision.models")
    models.inception_v3 = inception_v3
    inc = types.ModuleType("torchvision.models.inception")
    inc.InceptionA, inc.InceptionC = tf_inc.InceptionA, tf_inc.InceptionC
    inc.InceptionE = tf_inc.InceptionE_1
    models.inception = inc
    transforms = types.ModuleType("torchvision.transforms")
    tv.models, tv.transforms = models, transforms
    stubs = {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": inc,
             "torchvision.transforms": transforms}
    for name, module in stubs.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() must not raise while stubbed
    sys.modules.update(stubs)
    import pytorch_fid.fid_score
    import pytorch_fid.inception

    pytorch_fid.built_nets = built
    yield pytorch_fid
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.fixture(scope="module")
def torch_net(pytorch_fid, tmp_path_factory):
    """pytorch-fid's InceptionV3 (use_fid_inception=True) with random weights whose BatchNorm statistics are the
    batch statistics of a calibration batch, variances doubled (so activations stay O(1) through the 94 convs and
    round-off is not amplified); returns
    (model, path of its state dict saved as .pth)."""
    torch.manual_seed(0)
    built = pytorch_fid.built_nets
    original = pytorch_fid.inception.load_state_dict_from_url
    # fid_inception_v3 builds the net, swaps in the FID blocks, then loads the release weights: hand it the
    # net's own random state dict instead of a download
    pytorch_fid.inception.load_state_dict_from_url = lambda *args, **kwargs: built[-1].state_dict()
    try:
        model = pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True)
    finally:
        pytorch_fid.inception.load_state_dict_from_url = original
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.2, 0.2, generator=generator)
            module.momentum = None
    calibration = torch.rand(4, 3, 24, 20, generator=generator)  # the test images' size and distribution
    model.train()
    with torch.no_grad():
        model(calibration)
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            # doubling the variances makes every layer slightly contracting: without it the random 94-conv net
            # amplifies float32 round-off to ~5e-4 (torch float32 vs float64), with it to ~3e-7
            module.running_var.mul_(2.0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_flax_inception_matches_pytorch_fid_pool_features(torch_net):
    model, path = torch_net
    state = torch.load(path, weights_only=True)
    # pytorch-fid's InceptionV3 nests blocks as blocks.<i>.<j>; the release file uses torchvision names
    renamed = _to_release_names(model, state)
    params = inception.params_from_state_dict(renamed)
    images = np.random.default_rng(0).uniform(size=(2, 24, 20, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(images).permute(0, 3, 1, 2))[0].reshape(2, -1).numpy()
    extractor = fid.InceptionExtractor(params, batch_size=2)  # flaxdiff's [-1, 1] images (the fid-stats program)
    got = extractor(images * 2.0 - 1.0)
    assert got.shape == (2, 2048)
    assert np.abs(want).mean() > 0.05  # the features are O(1), not vanishing
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _to_release_names(model, state):
    """Map pytorch-fid InceptionV3's ``blocks.i.j.*`` keys to the torchvision names of the weight file."""
    names = {}
    order = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None, "Conv2d_3b_1x1", "Conv2d_4a_3x3", None,
             "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c", None]
    flat = [(i, j) for i, block in enumerate(model.blocks) for j in range(len(block))]
    assert len(flat) == len(order)
    for (i, j), name in zip(flat, order):
        if name is not None:
            names[f"blocks.{i}.{j}."] = name + "."
    out = {}
    for key, value in state.items():
        prefix = ".".join(key.split(".")[:3]) + "."
        out[names[prefix] + key[len(prefix):]] = value
    return out


def test_resize_matches_torch_interpolate():
    images = np.random.default_rng(1).uniform(size=(2, 13, 37, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(inception.bilinear_resize(jnp.asarray(images), 299))
    np.testing.assert_allclose(got, want, atol=2e-6)  # float32 rounding of the coordinates
    down = np.random.default_rng(2).uniform(size=(1, 400, 320, 1)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(down).permute(0, 3, 1, 2), size=(299, 299),
                                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    # one output column of 299 sits 1 float32 ulp (~3e-5 px) from torch's coordinate (fused multiply-add); with
    # neighbouring pixels differing by up to 1 that moves the value by up to ~3e-5
    np.testing.assert_allclose(np.asarray(inception.bilinear_resize(jnp.asarray(down), 299)), want, atol=3e-5)


def _features(seed: int, n: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_equals_pytorch_fid(pytorch_fid, method):
    a, b = _features(0, 400, 64), _features(1, 300, 64)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = pytorch_fid.fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    assert want > 1.0
    assert abs(got - want) <= 1e-6 * abs(want)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="method='svd'; accepted: sqrtm, eigh"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(ValueError, match="do not describe two Gaussians"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_streaming_stats_equal_numpy_and_round_trip_through_pytorch_fid(pytorch_fid, tmp_path):
    feats = _features(3, 257, 16) * 100.0 + 1e4  # large offset: the shifted sums must not cancel
    stats = fid.FeatureStats(16)
    for start in range(0, len(feats), 50):
        stats.update(feats[start:start + 50])
    assert stats.count == 257
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    merged = fid.FeatureStats(16).update(feats[:100]).merge(fid.FeatureStats(16).update(feats[100:]))
    np.testing.assert_allclose(merged.mu, stats.mu, rtol=1e-12)  # two hosts' shares combine exactly
    np.testing.assert_allclose(merged.sigma, stats.sigma, rtol=1e-9, atol=1e-9)
    path = fid.save_stats(tmp_path / "ref.npz", stats)
    mu, sigma = pytorch_fid.fid_score.compute_statistics_of_path(str(path), None, 1, 16, "cpu")
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)
    ours = fid.load_stats(path)
    np.testing.assert_array_equal(ours[0], mu)
    # a pytorch-fid stats file (its save_fid_stats writes np.savez_compressed(mu=..., sigma=...)) loads here
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu, sigma=sigma)
    np.testing.assert_array_equal(fid.load_stats(tmp_path / "theirs.npz")[1], sigma)
    with pytest.raises(ValueError, match="not an FID stats file"):
        np.savez(tmp_path / "bad.npz", images=np.zeros(3))
        fid.load_stats(tmp_path / "bad.npz")


def test_fid_of_a_dataset_against_itself_is_zero_and_halves_are_close():
    """On a tiny deterministic feature map (a fixed random projection of 8x8 digits, not Inception: the full
    network on 1797 images is too slow for CI) through the same streaming code path."""
    from flaxdiff import data

    source = data.digits_source("all")
    projection = np.random.default_rng(0).normal(size=(64, 24))

    def feature_fn(images):
        return np.tanh(np.asarray(images).reshape(len(images), -1) @ projection / 8.0)

    full = fid.stats_of_source(feature_fn, source, batch_size=256)
    assert full.count == len(source)
    assert fid.frechet_distance(*full.mu_sigma(), *full.mu_sigma()) == pytest.approx(0.0, abs=1e-8)
    features = feature_fn(source.images / 8.0 - 1.0)  # the loader's [-1, 1] images
    np.testing.assert_allclose(full.mu, features.mean(0), rtol=1e-6, atol=1e-9)
    halves = []
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(source))
        halves.append(fid.frechet_distance(*fid.FeatureStats(24).update(features[perm[:898]]).mu_sigma(),
                                           *fid.FeatureStats(24).update(features[perm[898:]]).mu_sigma()))
    # against a different distribution (the digits mirrored) the distance is far larger than between halves
    other = fid.frechet_distance(*fid.stats_of_images(feature_fn, source.images[:, :, ::-1] / 8.0 - 1.0),
                                 *full.mu_sigma())
    assert max(halves) < 0.1 * other
    assert max(halves) / min(halves) < 3.0


def test_weights_loader_reads_pth_and_safetensors_and_names_bad_files(torch_net, tmp_path):
    model, path = torch_net
    renamed = _to_release_names(model, torch.load(path, weights_only=True))
    release = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(renamed, release)
    from_pth = inception.load_inception_params(release)
    converted = inception.convert_weights(release, tmp_path / "inception.safetensors")
    from_st = inception.load_inception_params(converted)
    for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(from_st)):
        np.testing.assert_array_equal(a, b)
    kernel = from_pth["Mixed_7c"]["branch_pool"]["kernel"]
    np.testing.assert_array_equal(kernel, renamed["Mixed_7c.branch_pool.conv.weight"].numpy().transpose(2, 3, 1, 0))
    partial = {k: v for k, v in renamed.items() if not k.startswith("Mixed_7c.")}
    with pytest.raises(ValueError, match="lack .* entries, e.g. .*Mixed_7c"):
        inception.params_from_state_dict(partial)
    with pytest.raises(ValueError, match="do not exist; download https://github.com/mseitzer"):
        inception.load_inception_params(tmp_path / "missing.pth")


def test_fid_eval_streams_samples_against_a_dataset_or_its_stats_file(run_dir, tmp_path):
    """fid_eval of the tiny training.py checkpoint (16x16 digits) with a fixed projection as the feature map: the
    dataset and its saved stats give the same FID, equal to the FID of the same samples generated in one go."""
    from flaxdiff.pipeline import Pipeline

    projection = np.random.default_rng(0).normal(size=(256, 12))

    def feature_fn(images):
        return np.tanh(np.asarray(images).mean(-1).reshape(len(images), -1) @ projection / 16.0)

    stats_path = tmp_path / "digits_ref.npz"
    by_dataset = fid.fid_eval(run_dir, "digits", num_samples=20, steps=2, batch_size=10, feature_fn=feature_fn,
                              save_ref_stats=stats_path)
    by_stats = fid.fid_eval(run_dir, stats_path, num_samples=20, steps=2, batch_size=10, feature_fn=feature_fn)
    assert by_dataset["num_samples"] == by_stats["num_samples"] == 20
    assert by_stats["ref_count"] == by_dataset["ref_count"] == len(__import__("flaxdiff").data.digits_source())
    assert by_stats["fid"] == pytest.approx(by_dataset["fid"], rel=1e-12) and by_stats["fid"] > 0
    pipe = Pipeline.from_pretrained(run_dir)
    chunks = [pipe.generate(labels=(np.arange(s, s + 10) % pipe.num_classes).astype(np.int32), steps=2,
                            seed=1000003 * j, output="float", batch_size=10) for j, s in enumerate((0, 10))]
    features = feature_fn(np.concatenate(chunks))
    want = fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False), *fid.load_stats(stats_path))
    assert by_stats["fid"] == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="needs the Inception weights: pass weights=PATH"):
        fid.fid_eval(run_dir, stats_path, num_samples=4)


def test_fid_stats_command_matches_pytorch_fid_statistics_of_the_same_images(torch_net, tmp_path, capsys):
    """`flaxdiff data fid-stats FOLDER OUT.npz --weights W` on 3 PNGs equals mean/cov of pytorch-fid's features."""
    from PIL import Image

    from flaxdiff.data import commands

    model, path = torch_net
    release = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_to_release_names(model, torch.load(path, weights_only=True)), release)
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(5).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    out = tmp_path / "stats.npz"
    assert commands.main(["fid-stats", str(folder), str(out), "--weights", str(release), "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 3
    with torch.no_grad():
        want = model(torch.from_numpy(pixels / 255.0).float().permute(0, 3, 1, 2))[0].reshape(3, -1).numpy()
    mu, sigma = fid.load_stats(out)
    np.testing.assert_allclose(mu, want.mean(0), atol=1e-4)
    np.testing.assert_allclose(sigma, np.cov(want.astype(np.float64), rowvar=False), atol=1e-4)
    assert commands.main(["fid-stats", str(folder), str(out), "--weights", str(release)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_cli_data_and_eval_metric_fid_end_to_end(run_dir, tmp_path, capsys, monkeypatch):
    """`flaxdiff data fid-stats` of the digits and `flaxdiff eval CKPT --metric fid --ref STATS --weights W` of the
    tiny training.py checkpoint through the console entry point. The Inception network is replaced by a fixed
    projection here (its own path, weights -> features -> stats, is checked against pytorch-fid above); this test
    checks the CLI wiring: flags, the reference stats file, streaming over --batch-size, the JSON result."""
    from flaxdiff import cli

    projection = np.random.default_rng(0).normal(size=(256, 12))
    loaded = []

    def from_weights(path, **kwargs):
        loaded.append(Path(path).name)
        return lambda images: np.asarray(images).mean(-1).reshape(len(images), -1) @ projection

    monkeypatch.setattr(fid.InceptionExtractor, "from_weights", staticmethod(from_weights))
    weights = "pt_inception-2015-12-05-6726825d.pth"
    ref = tmp_path / "digits16.npz"
    assert cli.main(["data", "fid-stats", "digits", str(ref), "--weights", weights, "--image-size", "16",
                     "--batch-size", "8", "--limit", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40
    common = ["eval", str(run_dir), "--metric", "fid", "--ref", str(ref), "--num-samples", "20", "--batch-size", "10",
              "--steps", "2"]
    assert cli.main(common) == 2
    assert "--metric fid needs --weights PATH" in capsys.readouterr().err
    out = tmp_path / "fid.json"
    assert cli.main([*common, "--weights", weights, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and result["ref_count"] == 40 and result["method"] == "sqrtm"
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and result["steps"] == 2
    assert json.loads(capsys.readouterr().out)["out"] == str(out) and loaded == [weights, weights]
    assert cli.main([*common, "--weights", weights, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
