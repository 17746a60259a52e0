"""Sample-quality metrics: a cached MNIST classifier, class accuracy, Fréchet distances.

    from flaxdiff import metrics
    clf = metrics.get_mnist_classifier(image_size=32)      # trained once, cached on disk
    acc = metrics.class_accuracy(clf, samples, labels)     # samples (N, 32, 32, 1) in [-1, 1]
    fd = metrics.fid_from_images(real, samples, clf.features)

Any ``feature_fn: images -> (N, D)`` can replace ``clf.features``. The FID papers report uses the FID
Inception-v3 (:mod:`flaxdiff.metrics.inception`, :mod:`flaxdiff.metrics.fid`, docs/fid.md)::

    extractor = metrics.InceptionExtractor.from_weights("pt_inception-2015-12-05-6726825d.pth")
    fd = metrics.fid_from_images(real, samples, extractor)
"""
from __future__ import annotations

import numpy as np

from flaxdiff.metrics.classifier import (
    Classifier,
    DigitCNN,
    default_cache_dir,
    get_mnist_classifier,
    mnist_arrays,
    train_classifier,
)
from flaxdiff.metrics import fid, inception
from flaxdiff.metrics.fid import FeatureStats, InceptionExtractor, fid_eval, load_stats, save_stats
from flaxdiff.metrics.frechet import (
    batched_features,
    feature_statistics,
    fid_from_features,
    fid_from_images,
    frechet_distance,
)


def class_accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images the classifier assigns to their intended class: mean(predict(x) == y)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images) or len(labels) == 0:
        raise ValueError(f"got {len(images)} images and {len(labels)} labels; need equal, non-zero")
    return float((classifier.predict(images) == labels).mean())


def evaluate_class_conditional(images: np.ndarray, labels: np.ndarray,
                               classifier: Classifier | None = None,
                               reference_split: str = "train") -> dict[str, float]:
    """Class accuracy of conditional MNIST samples and their Fréchet distance (classifier
    features) to the bundled real ``reference_split`` digits at the classifier's size."""
    images = np.asarray(images, np.float32)
    if classifier is None:
        classifier = get_mnist_classifier(image_size=images.shape[1])
    real, _ = mnist_arrays(reference_split, classifier.image_size)
    return {
        "class_accuracy": class_accuracy(classifier, images, labels),
        "frechet_distance": fid_from_images(real, images, classifier.features),
        "classifier_test_accuracy": classifier.test_accuracy,
        "num_samples": float(len(images)),
    }


__all__ = [
    "FeatureStats", "InceptionExtractor", "fid", "fid_eval", "inception", "load_stats", "save_stats",
    "Classifier", "DigitCNN", "batched_features", "class_accuracy", "default_cache_dir",
    "evaluate_class_conditional", "feature_statistics", "fid_from_features", "fid_from_images",
    "frechet_distance", "get_mnist_classifier", "mnist_arrays", "train_classifier",
]
