"""Sampler accuracy against NFE on a Gaussian mixture with an exact denoiser, side by side with k-diffusion.

Problem: x0 ~ sum_k w_k N(m_k, c^2 I) in 2-D (8 modes on a circle) and 64-D (16 random modes). Under VE noise
the exact denoiser is the posterior mean

    D(x, s) = sum_k r_k(x) [m_k + c^2 / (c^2 + s^2) (x - m_k)],   r_k ∝ w_k N(x; m_k, (c^2 + s^2) I).

Every sampler starts from the same x = s_max eps and the reference endpoint is RK4 with 1000 Karras steps in float64
(converged to < 1e-8). Metrics: endpoint RMS error against the reference and sliced Wasserstein-2 distance to
exact GMM samples. k-diffusion (optional: pip install torch k-diffusion) runs on the same problem in float64.

    python benchmarks/bench_samplers.py [--out docs/samplers_benchmark.json] [--plot docs/samplers_error_vs_nfe.png]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import time
import types

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxdiff import samplers, timesteps  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
BUDGETS = (5, 10, 20, 50)
GRIDS = ("karras", "logsnr_uniform", "time_uniform", "time_quadratic")
OURS = {
    "euler": {}, "heun": {}, "dpm_2": {}, "rk4": {}, "dpmpp_2m": {},
    "dpmpp_2s_ancestral": {"eta": 0.0}, "dpmpp_2m_sde": {"eta": 0.0}, "dpmpp_3m_sde": {"eta": 0.0},
    "unipc": {"variant": "bh2"}, "unipc_bh1": {"variant": "bh1"},
}
# Our sampler name -> k-diffusion function name and extra arguments (deterministic versions only).
K_DIFFUSION = {
    "euler": ("sample_euler", {}), "heun": ("sample_heun", {}), "dpm_2": ("sample_dpm_2", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"eta": 0.0}), "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {"eta": 0.0}),
}


def make_problem(dim: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    if dim == 2:
        angles = np.arange(8) * 2 * np.pi / 8
        means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
        std = 0.15
    else:
        means = rng.normal(size=(16, dim)) * 1.0 / math.sqrt(dim) * 3.0
        std = 0.3
    weights = rng.dirichlet(np.full(means.shape[0], 5.0))
    return {"means": means, "std": std, "weights": weights}


def gmm_denoiser(problem: dict):
    means, c2 = jnp.asarray(problem["means"]), problem["std"] ** 2
    log_w = jnp.log(jnp.asarray(problem["weights"]))

    def denoise(x, sigma):
        var = c2 + sigma[:, None] ** 2
        sq = jnp.sum((x[:, None, :] - means[None]) ** 2, -1)
        logits = log_w[None] - 0.5 * sq / var - 0.5 * x.shape[-1] * jnp.log(var)
        resp = jax.nn.softmax(logits, -1)
        post = means[None] + (c2 / var)[:, :, None] * (x[:, None, :] - means[None])
        return jnp.einsum("bk,bkd->bd", resp, post)

    return denoise


def gmm_samples(problem: dict, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(problem["weights"]), size=n, p=problem["weights"])
    return problem["means"][comp] + problem["std"] * rng.normal(size=(n, problem["means"].shape[1]))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(a.shape[1], projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, 0), np.sort(b @ dirs, 0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def steps_for(nfe_per_step: int, budget: int) -> int:
    """Largest N with nfe_per_step (N - 1) + 1 <= budget (the last step into 0 is one Euler evaluation)."""
    return max(1, (budget - 1) // nfe_per_step + 1)


def load_k_diffusion():
    """Import k_diffusion.sampling, or None. Its package __init__ pulls in training-only deps (torchvision for image
    utilities), so when those are missing the sampling module is loaded with a stub for them."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    for name in list(sys.modules):
        if name.startswith("k_diffusion"):
            del sys.modules[name]
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return importlib.import_module("k_diffusion.sampling")


def torch_denoiser(problem: dict):
    import torch

    means = torch.tensor(problem["means"], dtype=torch.float64)
    log_w = torch.log(torch.tensor(problem["weights"], dtype=torch.float64))
    c2 = problem["std"] ** 2

    def model(x, sigma):
        var = c2 + sigma[:, None] ** 2
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        logits = log_w[None] - 0.5 * sq / var - 0.5 * x.shape[-1] * torch.log(var)
        resp = torch.softmax(logits, -1)
        post = means[None] + (c2 / var)[:, :, None] * (x[:, None, :] - means[None])
        return torch.einsum("bk,bkd->bd", resp, post)

    return model


def run(args: argparse.Namespace) -> dict:
    k_sampling = load_k_diffusion()
    results = {"config": {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "budgets": BUDGETS,
                          "k_diffusion": k_sampling is not None}, "problems": {}}
    if k_sampling is None:
        print("note: k-diffusion (and torch) not installed; running flaxdiff samplers only")
    for dim, n in ((2, args.samples_2d), (64, args.samples_64d)):
        problem = make_problem(dim, seed=dim)
        denoise = gmm_denoiser(problem)
        noise = jax.random.normal(jax.random.PRNGKey(dim), (n, dim), jnp.float64)
        exact = gmm_samples(problem, n, seed=100 + dim)
        ref_grid = timesteps.karras(1000, SIGMA_MIN, SIGMA_MAX)
        reference, _ = samplers.sample(denoise, noise, sampler="rk4", grid=ref_grid)
        check, _ = samplers.sample(denoise, noise, sampler="rk4", grid=timesteps.karras(500, SIGMA_MIN, SIGMA_MAX))
        ref_err = float(jnp.sqrt(jnp.mean((check - reference) ** 2)))
        rows = []

        def record(impl, name, grid_name, budget, nfe, x, seconds):
            x = np.asarray(x)
            rows.append({"impl": impl, "sampler": name, "grid": grid_name, "budget": budget, "nfe": int(nfe),
                         "error": float(np.sqrt(np.mean((x - np.asarray(reference)) ** 2))),
                         "swd": sliced_wasserstein(x, exact), "seconds": seconds})

        for name, options in OURS.items():
            registry_name = "unipc" if name.startswith("unipc") else name
            per_step = samplers.get(registry_name, **options).nfe_per_step
            for grid_name in GRIDS:
                for budget in BUDGETS:
                    steps = steps_for(per_step, budget)
                    start = time.perf_counter()
                    x, nfe = samplers.sample(denoise, noise, sampler=registry_name, steps=steps, grid=grid_name,
                                             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **options)
                    x = jax.block_until_ready(x)
                    record("flaxdiff", name, grid_name, budget, nfe, x, time.perf_counter() - start)
        if k_sampling is not None:
            import torch

            model = torch_denoiser(problem)
            x_start = torch.tensor(np.asarray(noise), dtype=torch.float64)
            for name, (fn_name, kwargs) in K_DIFFUSION.items():
                per_step = samplers.get(name).nfe_per_step
                for grid_name in GRIDS:
                    for budget in BUDGETS:
                        steps = steps_for(per_step, budget)
                        grid = timesteps.get(grid_name, steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
                        sigmas = torch.tensor(grid, dtype=torch.float64)
                        calls = [0]

                        def counted(x, sigma):
                            calls[0] += 1
                            return model(x, sigma)

                        start = time.perf_counter()
                        with torch.no_grad():
                            x = getattr(k_sampling, fn_name)(counted, x_start * sigmas[0], sigmas, disable=True,
                                                             **kwargs)
                        record("k-diffusion", name, grid_name, budget, calls[0], x.numpy(),
                               time.perf_counter() - start)
        results["problems"][f"{dim}d"] = {"samples": n, "reference_error_500_vs_1000": ref_err, "rows": rows,
                                          "exact_vs_exact_swd": sliced_wasserstein(gmm_samples(problem, n, 7),
                                                                                   exact)}
    return results


def summarize(results: dict) -> str:
    lines = []
    for key, problem in results["problems"].items():
        rows = problem["rows"]
        lines.append(f"### {key} Gaussian mixture ({problem['samples']} samples; endpoint RMS error / sliced W2)\n")
        lines.append("| impl | sampler | grid | " + " | ".join(f"NFE≤{b}" for b in BUDGETS) + " |")
        lines.append("|---|---|---|" + "---|" * len(BUDGETS))
        keys = sorted({(r["impl"], r["sampler"], r["grid"]) for r in rows}, key=lambda k: (k[1], k[2], k[0]))
        for impl, name, grid in keys:
            cells = []
            for budget in BUDGETS:
                row = next(r for r in rows if (r["impl"], r["sampler"], r["grid"], r["budget"]) ==
                           (impl, name, grid, budget))
                cells.append(f"{row['error']:.2e} / {row['swd']:.3f} ({row['nfe']})")
            lines.append(f"| {impl} | {name} | {grid} | " + " | ".join(cells) + " |")
        lines.append("")
        for budget in (10,):
            ours = min((r for r in rows if r["impl"] == "flaxdiff" and r["budget"] == budget),
                       key=lambda r: r["error"])
            lines.append(f"best flaxdiff at NFE≤{budget}: {ours['sampler']} on {ours['grid']}: {ours['error']:.3e}")
            theirs = [r for r in rows if r["impl"] == "k-diffusion" and r["budget"] == budget]
            if theirs:
                best_k_karras = min((r for r in theirs if r["grid"] == "karras"), key=lambda r: r["error"])
                best_k = min(theirs, key=lambda r: r["error"])
                lines.append(f"best k-diffusion at NFE≤{budget} on karras: {best_k_karras['sampler']}: "
                             f"{best_k_karras['error']:.3e} (ours {1 - ours['error'] / best_k_karras['error']:.0%} "
                             f"lower); on any grid: {best_k['sampler']} on {best_k['grid']}: {best_k['error']:.3e} "
                             f"(ours {1 - ours['error'] / best_k['error']:.0%} lower)")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["problems"]), figsize=(12, 4.5))
    for ax, (key, problem) in zip(np.atleast_1d(axes), results["problems"].items()):
        rows = problem["rows"]
        for impl, name, grid, style in [("flaxdiff", "unipc", "logsnr_uniform", "-o"),
                                        ("flaxdiff", "dpmpp_2m", "logsnr_uniform", "-s"),
                                        ("flaxdiff", "dpmpp_3m_sde", "logsnr_uniform", "-^"),
                                        ("flaxdiff", "heun", "karras", "-d"),
                                        ("flaxdiff", "euler", "karras", "-x"),
                                        ("k-diffusion", "dpmpp_2m", "karras", "--s"),
                                        ("k-diffusion", "dpmpp_3m_sde", "karras", "--^"),
                                        ("k-diffusion", "heun", "karras", "--d"),
                                        ("k-diffusion", "euler", "karras", "--x")]:
            pts = sorted((r["nfe"], r["error"]) for r in rows if (r["impl"], r["sampler"], r["grid"]) ==
                         (impl, name, grid))
            if pts:
                ax.loglog(*zip(*pts), style, label=f"{impl} {name} ({grid})")
        ax.set_title(f"{key} Gaussian mixture")
        ax.set_xlabel("NFE")
        ax.set_ylabel("endpoint RMS error")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/samplers_benchmark.json")
    parser.add_argument("--plot", default="docs/samplers_error_vs_nfe.png")
    parser.add_argument("--samples-2d", type=int, default=4096)
    parser.add_argument("--samples-64d", type=int, default=1024)
    args = parser.parse_args()
    results = run(args)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(summarize(results))


if __name__ == "__main__":
    main()
