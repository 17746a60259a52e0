"""Fréchet distance between Gaussians fitted to features (FID when the features are
InceptionV3 pool features; here any ``feature_fn: images -> (N, D)`` plugs in).

    d^2 = ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})

``tr((C1 C2)^{1/2})`` is computed stably as ``sum_i sqrt(lambda_i)`` over the eigenvalues of
the symmetric PSD matrix ``C1^{1/2} C2 C1^{1/2}`` (same spectrum as ``C1 C2``), with
``C1^{1/2}`` from ``eigh`` and tiny negative eigenvalues from round-off clipped to zero.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix: ``V diag(sqrt(max(w, 0))) V^T``."""
    w, v = np.linalg.eigh((cov + cov.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features of shape {features.shape}: expected (N, D) with N >= 2")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shapes mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 "
                         f"{cov2.shape} do not describe two Gaussians of one dimension")
    sqrt1 = _psd_sqrt(cov1)
    middle = sqrt1 @ cov2 @ sqrt1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def batched_features(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """``concat([feature_fn(images[i:i + batch_size]) ...])`` as float64 (N, D)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    chunks = [np.asarray(feature_fn(images[i:i + batch_size]), np.float64)
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks).reshape(len(images), -1)


def fid_from_images(images1: np.ndarray, images2: np.ndarray, feature_fn: FeatureFn,
                    batch_size: int = 500) -> float:
    """Fréchet distance in the space of ``feature_fn`` (e.g. ``classifier.features`` or an
    InceptionV3 pool-3 extractor), between two image sets."""
    return fid_from_features(batched_features(feature_fn, images1, batch_size),
                             batched_features(feature_fn, images2, batch_size))
