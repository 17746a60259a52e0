"""Tests for flaxdiff.metrics: the cached MNIST classifier and Fréchet distances."""
import pathlib

import numpy as np
import pytest
import scipy.linalg

from flaxdiff import metrics
from flaxdiff.metrics import classifier as classifier_module

#: The stated accuracy of the default classifier on the 500 held-out real digits.
MIN_TEST_ACCURACY = 0.95


@pytest.fixture(scope="session")
def classifier(mnist_classifier_dir):
    """The default classifier: trained from scratch into the empty cache (tests/conftest.py), then loaded here."""
    return metrics.get_mnist_classifier(image_size=32, cache_dir=mnist_classifier_dir)


@pytest.fixture(scope="session")
def real_digits():
    return metrics.mnist_arrays("all", 32)


def test_classifier_accuracy_on_held_out_digits(classifier, mnist_classifier_dir):
    assert classifier.test_accuracy >= MIN_TEST_ACCURACY
    images, labels = metrics.mnist_arrays("validation", 32)
    assert metrics.class_accuracy(classifier, images, labels) == pytest.approx(classifier.test_accuracy)
    rng = np.random.default_rng(0)
    assert metrics.class_accuracy(classifier, images, rng.permutation(labels)) < 0.3
    assert classifier.features(images[:7]).shape == (7, 128)
    native = images[:, 2:30, 2:30]  # 28x28 inputs are resized to the classifier's 32x32
    assert metrics.class_accuracy(classifier, native, labels) > 0.9
    for name in ("mnist_cnn_32px_v1.json", "mnist_cnn_32px_v1.msgpack"):
        assert (pathlib.Path(mnist_classifier_dir) / name).is_file()


def test_classifier_cache_reload_without_training(classifier, mnist_classifier_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached classifier must not be retrained")

    monkeypatch.setattr(classifier_module, "train_classifier", fail)
    monkeypatch.setattr(classifier_module, "_LOADED", {})
    reloaded = metrics.get_mnist_classifier(image_size=32, cache_dir=mnist_classifier_dir)
    assert reloaded is not classifier and reloaded.test_accuracy == classifier.test_accuracy
    images, _ = metrics.mnist_arrays("validation", 32)
    np.testing.assert_allclose(reloaded.logits(images[:20]), classifier.logits(images[:20]), atol=1e-5)


def test_cache_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAXDIFF_CACHE", str(tmp_path))
    assert metrics.default_cache_dir() == tmp_path / "classifier"
    monkeypatch.delenv("FLAXDIFF_CACHE")
    assert metrics.default_cache_dir() == pathlib.Path.home() / ".cache" / "flaxdiff" / "classifier"
    with pytest.raises(ValueError, match="image_size=8"):
        metrics.get_mnist_classifier(image_size=8, cache_dir=tmp_path)


def test_real_vs_real_near_zero_real_vs_noise_large(classifier, real_digits):
    images, _ = real_digits
    perm = np.random.default_rng(1).permutation(len(images))
    half_a, half_b = images[perm[:2500]], images[perm[2500:]]
    noise = np.random.default_rng(2).uniform(-1, 1, half_b.shape).astype(np.float32)
    real_real = metrics.fid_from_images(half_a, half_b, classifier.features)
    real_noise = metrics.fid_from_images(half_a, noise, classifier.features)
    # measured: about 3 vs about 1200 (2500 vs 2500 digits, 128-d features)
    assert real_real < 10.0
    assert real_noise > 200.0
    assert real_real < 0.02 * real_noise


def test_evaluate_class_conditional_on_real_digits(classifier):
    images, labels = metrics.mnist_arrays("validation", 32)
    result = metrics.evaluate_class_conditional(images, labels, classifier)
    assert result["class_accuracy"] == pytest.approx(classifier.test_accuracy)
    assert result["frechet_distance"] < 15.0
    assert result["classifier_test_accuracy"] == classifier.test_accuracy


def test_frechet_distance_closed_forms():
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(2.0, 4.0, -1.0, 1.0) == pytest.approx(9.0 + 1.0)
    # non-commuting 2x2: tr sqrt(C1 C2) = sqrt(tr(C1 C2) + 2 sqrt(det(C1 C2)))
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = c1 @ c2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    zero = np.zeros(2)
    assert metrics.frechet_distance(zero, c1, zero, c2) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(zero, c2, zero, c1) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    c3, c4 = x @ x.T / 20, y @ y.T / 20 + np.eye(20) * 1e-3
    reference = np.trace(c3 + c4 - 2 * scipy.linalg.sqrtm(c3 @ c4).real)
    assert metrics.frechet_distance(np.zeros(20), c3, np.zeros(20), c4) == pytest.approx(reference, rel=1e-6)
    singular = np.outer([1.0, 2.0], [1.0, 2.0])  # rank 1: stays finite and non-negative
    assert metrics.frechet_distance(zero, singular, zero, singular) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="do not describe two Gaussians"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_fid_from_samples_and_feature_fn_plug_in():
    rng = np.random.default_rng(3)
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.5, 0.0]), np.array([-0.5, 1.0])
    f1 = rng.multivariate_normal(mu1, c1, size=200_000)
    f2 = rng.multivariate_normal(mu2, c2, size=200_000)
    exact = metrics.frechet_distance(mu1, c1, mu2, c2)
    assert metrics.fid_from_features(f1, f2) == pytest.approx(exact, rel=0.02)
    images1, images2 = f1[:1000].reshape(1000, 1, 2, 1), f2[:1000].reshape(1000, 1, 2, 1)
    flatten = lambda imgs: np.asarray(imgs).reshape(len(imgs), -1)
    assert metrics.fid_from_images(images1, images2, flatten, batch_size=300) == pytest.approx(
        metrics.fid_from_features(f1[:1000], f2[:1000]), rel=1e-12)
    with pytest.raises(ValueError, match="expected \\(N, D\\) with N >= 2"):
        metrics.feature_statistics(np.zeros((1, 4)))
