"""Inception FID: features of the FID Inception-v3 sharded over a mesh, streaming statistics in float64, the
Fréchet distance, and the pytorch-fid ``.npz`` stats layout.

    d^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

Statistics of any number of images in bounded memory (O(D^2), not O(N D)): with a shift c (the mean of the first
batch, which keeps the sums well conditioned), n images, s = sum_i (f_i - c), M = sum_i (f_i - c)(f_i - c)^T,

    mu = c + s / n,        S = (M - s s^T / n) / (n - 1)        (the unbiased covariance, = np.cov(f, rowvar=False)).

Stats files hold ``mu`` (D,) and ``sigma`` (D, D) float64 (the keys pytorch-fid's ``compute_statistics_of_path``
reads), plus ``count``.

    from flaxdiff.metrics import fid
    extractor = fid.InceptionExtractor.from_weights("pt_inception-2015-12-05-6726825d.pth")
    ref = fid.stats_of_source(extractor, "path/to/images_or_arrayrecord_dir")
    fid.save_stats("ref.npz", ref)
    value = fid.frechet_distance(*fid.stats_of_images(extractor, samples), *ref.mu_sigma())
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff.metrics import inception

logger = logging.getLogger(__name__)

__all__ = ["FeatureStats", "InceptionExtractor", "add_eval_arguments", "eval_command", "fid_eval", "frechet_distance",
           "load_stats", "save_stats",
           "stats_of_batches", "stats_of_images", "stats_of_source"]

FeatureFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------------------------
# The Fréchet distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "sqrtm", eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    method "sqrtm": ``tr((S1 S2)^{1/2})`` from ``scipy.linalg.sqrtm(S1 @ S2)`` as pytorch-fid computes it (adding
    ``eps I`` to both covariances when the product is singular; an imaginary part above 1e-3 on the diagonal is an
    error). method "eigh": ``sum_i sqrt(lambda_i)`` over the eigenvalues of the PSD ``S1^{1/2} S2 S1^{1/2}`` (same
    spectrum as S1 S2; see :func:`flaxdiff.metrics.frechet.frechet_distance`), robust for rank-deficient S.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape} "
                         f"do not describe two Gaussians of one dimension")
    if method == "eigh":
        from flaxdiff.metrics.frechet import frechet_distance as eigh_distance

        return eigh_distance(mu1, sigma1, mu2, sigma2)
    if method != "sqrtm":
        raise ValueError(f"method={method!r}; accepted: sqrtm, eigh")
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"sqrtm(S1 S2) has an imaginary diagonal part {imaginary:.3g} > 1e-3; use "
                             f"method='eigh'")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ------------------------------------------------------------------------------------------------------------------
# Streaming statistics and the .npz layout


@dataclasses.dataclass
class FeatureStats:
    """Running shifted sums of features (see the module docstring); :meth:`update` with (B, D) batches."""

    dim: int
    count: int = 0
    shift: np.ndarray | None = None
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def update(self, features: np.ndarray) -> "FeatureStats":
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {features.shape}: expected (B, {self.dim})")
        if len(features) == 0:
            return self
        if self.shift is None:
            self.shift = features.mean(axis=0)
            self.total = np.zeros(self.dim)
            self.outer = np.zeros((self.dim, self.dim))
        centred = features - self.shift
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred
        self.count += len(features)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the sums of ``other`` (e.g. another host's share): with d = c_other - c_self,
        ``s += s_o + n_o d`` and ``M += M_o + s_o d^T + d s_o^T + n_o d d^T`` (re-shifted to c_self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature stats of dimension {other.dim} into dimension {self.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.shift, self.total, self.outer = other.shift.copy(), other.total.copy(), other.outer.copy()
            self.count = other.count
            return self
        d = other.shift - self.shift
        self.total += other.total + other.count * d
        self.outer += (other.outer + np.outer(other.total, d) + np.outer(d, other.total)
                       + other.count * np.outer(d, d))
        self.count += other.count
        return self

    @property
    def mu(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features were added; the mean needs at least 1")
        return self.shift + self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"{self.count} feature vector(s); the covariance needs at least 2")
        cov = (self.outer - np.outer(self.total, self.total) / self.count) / (self.count - 1)
        return (cov + cov.T) / 2.0

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def save_stats(path: str | Path, stats: FeatureStats | tuple[np.ndarray, np.ndarray], count: int | None = None
               ) -> Path:
    """Write ``mu``, ``sigma`` (float64) and ``count`` to an ``.npz`` (pytorch-fid reads ``mu`` and ``sigma``)."""
    if isinstance(stats, FeatureStats):
        mu, sigma, count = stats.mu, stats.sigma, stats.count
    else:
        mu, sigma = stats
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"stats file {str(path)!r}: expected a .npz path")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             count=np.int64(-1 if count is None else count))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a stats ``.npz`` (ours or pytorch-fid's ``--save-stats`` output)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"stats file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{str(path)!r} is not an FID stats file: it has {sorted(f.keys())}, "
                             f"expected 'mu' and 'sigma'")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{str(path)!r} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    return mu, sigma


# ------------------------------------------------------------------------------------------------------------------
# Inception features over a mesh


class InceptionExtractor:
    """``images (N, H, W, C) -> pool features (N, 2048)`` float64 with the FID Inception, jitted, the batch split
    over every device of ``mesh`` (default: a 1-d mesh of the local devices); every chunk is padded to
    ``batch_size`` (rounded up to a multiple of the device count) so one compilation serves any N.
    ``value_range`` is the range of float inputs (flaxdiff images are in [-1, 1]); uint8 is 0..255."""

    def __init__(self, params: Any, batch_size: int = 64, mesh: jax.sharding.Mesh | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), resize: bool = True) -> None:
        from jax.sharding import NamedSharding, PartitionSpec

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.mesh = mesh if mesh is not None else jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        self.devices = int(self.mesh.devices.size)
        self.batch_size = int(math.ceil(batch_size / self.devices)) * self.devices
        self.value_range = value_range
        self.dim = inception.POOL_DIM
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
        self.params = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)
        module = inception.FIDInceptionV3()
        lo_hi = value_range

        @jax.jit
        def features(params: Any, images: jax.Array) -> jax.Array:
            x = inception.preprocess(images, lo_hi, resize=resize)
            return module.apply({"params": params}, x)

        self._features = features

    @classmethod
    def from_weights(cls, path: str | Path, **kwargs: Any) -> "InceptionExtractor":
        """From the pytorch-fid weight file (``.pth``) or its safetensors conversion."""
        return cls(inception.load_inception_params(path), **kwargs)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images of shape {images.shape}: expected (N, H, W, C) with C in (1, 3)")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            rows = len(chunk)
            pad = self.batch_size - rows  # one shape for every chunk: one compilation whatever N
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            sharded = jax.device_put(chunk, self.batch_sharding)
            out.append(np.asarray(jax.device_get(self._features(self.params, sharded)), np.float64)[:rows])
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def stats_of_batches(feature_fn: FeatureFn, batches: Iterable[np.ndarray], dim: int | None = None) -> FeatureStats:
    """Streaming :class:`FeatureStats` of ``feature_fn`` over image batches (memory O(D^2 + batch))."""
    stats: FeatureStats | None = None
    for batch in batches:
        features = np.asarray(feature_fn(batch), np.float64)
        if stats is None:
            stats = FeatureStats(dim or features.shape[1])
        stats.update(features)
    if stats is None:
        raise ValueError("no images: the batch iterator was empty")
    return stats


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start:start + size]


def stats_of_images(feature_fn: FeatureFn, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of an in-memory image array."""
    return stats_of_batches(feature_fn, _chunks(np.asarray(images), batch_size)).mu_sigma()


def _source_batches(source: Any, batch_size: int, image_size: int | None, limit: int | None
                    ) -> Iterator[np.ndarray]:
    """Batches of a data source in [-1, 1], RGB or gray as stored, resized (centre crop) to ``image_size``."""
    from flaxdiff import data

    count = len(source) if limit is None else min(limit, len(source))
    loader = data.make_loader(source, min(batch_size, count), image_size, shuffle=False, num_epochs=1,
                              drop_remainder=False, shard_index=0, shard_count=1)
    seen = 0
    for batch in loader:
        images = np.asarray(batch["image"])[: count - seen]
        seen += len(images)
        yield images
        if seen >= count:
            return


def stats_of_source(feature_fn: FeatureFn, source: Any, batch_size: int = 64, image_size: int | None = None,
                    limit: int | None = None) -> FeatureStats:
    """Stats of every image (or the first ``limit``) of a data source or a ``load_source`` spec (image folder,
    ``.npz``, converted ArrayRecord directory, ...). Images go through the loader as [-1, 1] floats, so
    ``feature_fn`` must expect that range (:class:`InceptionExtractor`'s default)."""
    from flaxdiff import data

    if isinstance(source, (str, Path)):
        source = data.load_source(str(source))
    if getattr(source, "kind", "pixels") == "latents":
        raise ValueError(f"{source!r} holds VAE latents, not images; compute FID statistics on the pixel dataset "
                         f"it was encoded from (its manifest's 'source')")
    return stats_of_batches(feature_fn, _source_batches(source, batch_size, image_size, limit))


# ------------------------------------------------------------------------------------------------------------------
# FID of a checkpoint


def reference_stats(ref: str | Path, feature_fn: FeatureFn, batch_size: int = 64, image_size: int | None = None,
                    limit: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of ``ref``: a stats ``.npz`` (count -1 when unknown) or a dataset spec."""
    if str(ref).endswith(".npz"):
        with np.load(Path(ref).expanduser(), allow_pickle=False) as f:
            is_stats = "mu" in f and "sigma" in f
            count = int(f["count"]) if "count" in f else -1
        if is_stats:
            mu, sigma = load_stats(ref)
            return mu, sigma, count
    stats = stats_of_source(feature_fn, ref, batch_size, image_size, limit)
    return stats.mu, stats.sigma, stats.count


def fid_eval(checkpoint_dir: Any, ref: str | Path, weights: str | Path | None = None,
             num_samples: int = 10000, sampler: str | None = None, steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0, batch_size: int = 250, feature_batch_size: int = 64,
             step: int | None = None, ema: bool | None = None, save_ref_stats: str | Path | None = None,
             feature_fn: FeatureFn | None = None, **sample_settings: Any) -> dict[str, Any]:
    """FID of ``num_samples`` samples of a checkpoint (a run directory or a loaded
    :class:`~flaxdiff.pipeline.Pipeline`) against ``ref`` (stats ``.npz`` or dataset), streaming.

    The distance uses scipy's ``sqrtm`` like pytorch-fid when both sets have more samples than feature dimensions
    (covariances of full rank), the eigenvalue form otherwise. Samples are drawn ``batch_size`` at a time
    (chunk j with seed ``seed + 1000003 j``), scored and dropped, so
    memory is bounded whatever ``num_samples``. Class-conditional models draw labels ``i mod num_classes``;
    text-conditioned models take the captions of ``ref`` in order (ref must then be a captioned dataset).
    ``weights`` is the FID Inception weight file (or pass any ``feature_fn`` on [-1, 1] images). Sampling settings
    left None (sampler, steps, guidance, ``grid``, ``guidance_interval`` in ``sample_settings``) are the run's.
    """
    from flaxdiff.pipeline import Pipeline

    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} must be >= 2 (the covariance needs two samples)")
    if feature_fn is None:
        if weights is None:
            raise ValueError(f"FID needs the Inception weights: pass weights=PATH ({inception.FID_WEIGHTS_URL})")
        feature_fn = InceptionExtractor.from_weights(weights, batch_size=feature_batch_size)
    pipe = checkpoint_dir if isinstance(checkpoint_dir, Pipeline) else Pipeline.from_pretrained(
        checkpoint_dir, step=step, ema=ema)
    ref_mu, ref_sigma, ref_count = reference_stats(ref, feature_fn, feature_batch_size, pipe.image_shape[0])
    if save_ref_stats is not None:
        save_stats(save_ref_stats, (ref_mu, ref_sigma), ref_count)
    prompts = None
    if pipe.text is not None:
        from flaxdiff import data

        ref_source = data.load_source(str(ref)) if not str(ref).endswith(".npz") else None
        prompts = list(getattr(ref_source, "captions", None) or [])
        if not prompts:
            raise ValueError(f"{checkpoint_dir} is text-conditioned: --ref must be a captioned dataset to draw the "
                             f"prompts from; {ref} has no captions")
    stats = FeatureStats(inception.POOL_DIM if isinstance(feature_fn, InceptionExtractor) else 0)
    for chunk_index, start in enumerate(range(0, num_samples, batch_size)):
        rows = min(batch_size, num_samples - start)
        kwargs: dict[str, Any] = {}
        if prompts is not None:
            kwargs["prompts"] = [prompts[(start + i) % len(prompts)] for i in range(rows)]
        elif pipe.num_classes > 0:
            kwargs["labels"] = (np.arange(start, start + rows) % pipe.num_classes).astype(np.int32)
        else:
            kwargs["num_images"] = rows
        images = pipe.generate(sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                               seed=seed + 1000003 * chunk_index, output="float", batch_size=batch_size,
                               **kwargs, **sample_settings)
        features = np.asarray(feature_fn(images), np.float64)
        if stats.dim == 0:
            stats = FeatureStats(features.shape[1])
        stats.update(features)
        logger.info("fid: %d / %d samples scored", stats.count, num_samples)
    # scipy's sqrtm (pytorch-fid's method) needs full-rank covariances: with no more samples than feature
    # dimensions S is singular, sqrtm slow and inaccurate, and the eigenvalue form is the well-defined one
    full_rank = stats.count > stats.dim and (ref_count < 0 or ref_count > stats.dim)
    method = "sqrtm" if full_rank else "eigh"
    value = frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma, method=method)
    return {"fid": value, "method": method, "num_samples": stats.count, "ref": str(ref), "ref_count": ref_count,
            "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, **sample_settings, "seed": seed,
            "step": pipe.step, "ema": ema}


# ------------------------------------------------------------------------------------------------------------------
# The ``flaxdiff eval --metric fid`` hooks


def add_eval_arguments(parser: Any) -> None:
    """The FID options of ``flaxdiff eval``: ``--metric {classifier,fid}``, ``--ref``, ``--weights``,
    ``--num-samples``, ``--save-ref-stats``."""
    parser.add_argument("--metric", default="classifier", choices=("classifier", "fid"),
                        help="classifier: MNIST digit classifier accuracy + Fréchet distance; fid: Inception FID")
    parser.add_argument("--ref", default=None,
                        help="FID reference: a stats .npz (mu, sigma) or a dataset (folder, converted dir, mnist...)")
    parser.add_argument("--weights", default=None,
                        help=f"FID Inception weights ({Path(inception.FID_WEIGHTS_URL).name} or its safetensors)")
    parser.add_argument("--num-samples", type=int, default=10000, help="FID samples (streamed in --batch-size)")
    parser.add_argument("--save-ref-stats", default=None, help="also write the reference stats to this .npz")


def eval_command(args: Any, pipe: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """``flaxdiff eval CKPT --metric fid --ref REF --weights W``: :func:`fid_eval` of the loaded ``pipe`` with the
    CLI's sampling ``settings``, written to ``--out`` (default ``CKPT/fid_step_<step>.json``) unless it exists
    (``--overwrite``)."""
    import json

    if args.ref is None:
        raise ValueError("--metric fid needs --ref: a stats .npz or a dataset")
    if args.weights is None:
        raise ValueError(f"--metric fid needs --weights PATH (download {inception.FID_WEIGHTS_URL}; docs/fid.md)")
    out = Path(args.out) if args.out else Path(args.checkpoint_dir) / f"fid_step_{pipe.step}.json"
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite or --out")
    result = fid_eval(pipe, args.ref, weights=args.weights, num_samples=args.num_samples, seed=args.seed,
                      batch_size=args.batch_size, feature_batch_size=min(64, args.batch_size),
                      save_ref_stats=args.save_ref_stats, **settings)
    result["checkpoint_dir"] = str(Path(args.checkpoint_dir).absolute())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "out": str(out)}
