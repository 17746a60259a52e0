"""Sampler accuracy against NFE on a Gaussian mixture with an exact denoiser, side by side with k-diffusion.

Problem: x0 ~ sum_k w_k N(m_k, c^2 I) in 2-D (8 modes on a circle) and 64-D (16 random modes). Under VE noise
the exact denoiser is the posterior mean

    D(x, s) = sum_k r_k(x) [m_k + c^2 / (c^2 + s^2) (x - m_k)],   r_k ∝ w_k N(x; m_k, (c^2 + s^2) I).

Every sampler starts from the same x = s_max eps and the reference endpoint is RK4 with 1000 Karras steps in float64
(converged to < 1e-8). Metrics: endpoint RMS error against the reference and sliced Wasserstein-2 distance to
exact GMM samples. Ours: every deterministic form the sampler registry declares, plus solver-order variants, on
every grid in GRIDS, at every budget 5-20 NFE and 50. k-diffusion (optional, DEVELOPERS.md) runs on the same problem
in float64 with its deterministic samplers (dpm_fast picks its own levels for a budget). The summary gives, per
budget, the best (sampler, grid) of each side and picks the default pair: the smallest worst-case ratio of its error
to k-diffusion's best over budgets 5-20 and both problems.

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

from _common import load_average  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
BUDGETS = tuple(range(5, 21)) + (50,)
SUMMARY_BUDGETS = tuple(range(5, 21))
GRIDS = ("karras", "logsnr_uniform", "time_uniform", "time_quadratic", "flow_shift")
# The grids k-diffusion itself provides: get_sigmas_karras, get_sigmas_exponential (= logsnr_uniform) and
# get_sigmas_vp (the VP-SDE's uniform time, here fitted to the same [SIGMA_MIN, SIGMA_MAX]).
K_DIFFUSION_GRIDS = ("karras", "logsnr_uniform", "time_uniform")
# Solver-order variants measured next to each sampler's declared deterministic forms.
VARIANTS = {"unipc": ({"solver_order": 2},), "ipndm": ({"solver_order": 2}, {"solver_order": 4}),
            "lms": ({"solver_order": 2}, {"solver_order": 4})}


def our_samplers() -> dict[str, tuple[str, dict]]:
    """label -> (registry name, options): every fixed-grid sampler's deterministic forms and the VARIANTS, each also
    with every low-budget option set the sampler declares (e.g. the analytical first step)."""
    out = {}
    for name in samplers.available():
        sampler = samplers.get(name)
        if sampler.accuracy_sweep:
            continue
        for options in sampler.deterministic_options + VARIANTS.get(name, ()):
            for extra in ({},) + sampler.low_budget_options:
                merged = {**options, **extra}
                out[name + "".join(f"[{k}={v}]" for k, v in merged.items() if k != "eta")] = (name, merged)
    return out


# label -> k-diffusion function name, arguments, NFE per step (deterministic versions only).
K_DIFFUSION = {
    "euler": ("sample_euler", {}, 1), "heun": ("sample_heun", {}, 2), "dpm_2": ("sample_dpm_2", {}, 2),
    "lms": ("sample_lms", {}, 1), "lms[order=3]": ("sample_lms", {"order": 3}, 1),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, 1), "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {"eta": 0.0}, 1),
    "dpmpp_2m_sde[solver_type=heun]": ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 1),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {"eta": 0.0}, 1),
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


def our_steps_for(sampler: samplers.Sampler, budget: int) -> int:
    """Largest number of intervals N whose exact NFE (``sampler.nfe`` on N + 1 levels ending at 0) is <= budget:
    steps_for, plus one interval for a sampler whose analytical first step calls no network."""
    steps = steps_for(sampler.nfe_per_step, budget)
    while sampler.nfe(steps + 2, True) <= budget:
        steps += 1
    return steps


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
    args.samplers = getattr(args, "samplers", None)
    k_sampling = load_k_diffusion()
    results = {"config": {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "budgets": BUDGETS,
                          "k_diffusion": k_sampling is not None}, "problems": {}}
    if k_sampling is None:
        print("note: k-diffusion (and torch) not installed; running flaxdiff samplers only")
    for dim, n in ((2, args.samples_2d), (64, args.samples_64d)):
        if dim not in (getattr(args, "problems", None) or (2, 64)):
            continue
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

        for label, (registry_name, options) in our_samplers().items():
            if args.samplers and registry_name not in args.samplers:
                continue
            jax.clear_caches()  # hundreds of compiled grids otherwise exhaust memory
            sampler = samplers.get(registry_name, **options)
            for budget in BUDGETS:
                for grid_name in GRIDS:
                    steps = our_steps_for(sampler, budget)
                    start = time.perf_counter()
                    x, nfe = samplers.sample(denoise, noise, sampler=registry_name, steps=steps, grid=grid_name,
                                             sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **options)
                    x = jax.block_until_ready(x)
                    record("flaxdiff", label, grid_name, budget, nfe, x, time.perf_counter() - start)
            print(f"{dim}-D: flaxdiff {label} done", file=sys.stderr, flush=True)
        if k_sampling is not None:
            import torch

            model = torch_denoiser(problem)
            x_start = torch.tensor(np.asarray(noise), dtype=torch.float64)
            for name, (fn_name, kwargs, per_step) in K_DIFFUSION.items():
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
            for budget in BUDGETS:
                calls = [0]

                def counted_fast(x, sigma):
                    calls[0] += 1
                    return model(x, sigma)

                start = time.perf_counter()
                with torch.no_grad():
                    x = k_sampling.sample_dpm_fast(counted_fast, x_start * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, budget,
                                                   disable=True)
                record("k-diffusion", "dpm_fast", "own", budget, calls[0], x.numpy(), time.perf_counter() - start)
        results["problems"][f"{dim}d"] = {"samples": n, "reference_error_500_vs_1000": ref_err, "rows": rows,
                                          "exact_vs_exact_swd": sliced_wasserstein(gmm_samples(problem, n, 7),
                                                                                   exact)}
    return results


def best_rows(rows: list[dict], impl: str, budget: int, grids: tuple[str, ...] | None = None) -> dict | None:
    """The lowest-error row of ``impl`` whose NFE is within ``budget`` (on ``grids`` when given; dpm_fast's own
    levels always count)."""
    candidates = [r for r in rows if r["impl"] == impl and r["budget"] == budget and r["nfe"] <= budget
                  and (grids is None or r["grid"] in grids + ("own",))]
    return min(candidates, key=lambda r: r["error"]) if candidates else None


def choose_default(results: dict) -> tuple[tuple[str, str], float]:
    """Our (sampler, grid) pair with the smallest worst-case error ratio to k-diffusion's best over
    SUMMARY_BUDGETS and every problem (falls back to our own best per budget without k-diffusion)."""
    worst: dict[tuple[str, str], float] = {}
    for problem in results["problems"].values():
        rows = problem["rows"]
        for budget in SUMMARY_BUDGETS:
            reference = (best_rows(rows, "k-diffusion", budget, K_DIFFUSION_GRIDS)
                         or best_rows(rows, "flaxdiff", budget))
            for r in rows:
                if r["impl"] == "flaxdiff" and r["budget"] == budget:
                    key = (r["sampler"], r["grid"])
                    worst[key] = max(worst.get(key, 0.0), r["error"] / reference["error"])
    pair = min(worst, key=worst.get)
    return pair, worst[pair]


def summarize(results: dict) -> str:
    lines = []
    (default_sampler, default_grid), default_worst = choose_default(results)
    for key, problem in results["problems"].items():
        rows = problem["rows"]
        lines.append(f"### {key} Gaussian mixture ({problem['samples']} samples): best of each side per budget\n")
        lines.append("| NFE | best flaxdiff (sampler, grid) | error | best k-diffusion, its grids | error | "
                     "ours lower by | default pair error (lower by) | best k-diffusion, any of our grids | error |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        misses = []
        for budget in BUDGETS:
            ours = best_rows(rows, "flaxdiff", budget)
            theirs = best_rows(rows, "k-diffusion", budget, K_DIFFUSION_GRIDS)
            anywhere = best_rows(rows, "k-diffusion", budget)
            default = next(r for r in rows if (r["impl"], r["sampler"], r["grid"], r["budget"]) ==
                           ("flaxdiff", default_sampler, default_grid, budget))
            if theirs is None:
                lines.append(f"| {budget} | {ours['sampler']}, {ours['grid']} | {ours['error']:.2e} | - | - | - | "
                             f"{default['error']:.2e} | - | - |")
                continue
            reduction = 1 - ours["error"] / theirs["error"]
            if 5 <= budget <= 20 and reduction < 0.5:
                misses.append(f"NFE {budget}: {reduction:.0%}")
            lines.append(f"| {budget} | {ours['sampler']}, {ours['grid']} | {ours['error']:.2e} | "
                         f"{theirs['sampler']}, {theirs['grid']} | {theirs['error']:.2e} | "
                         f"{1 - ours['error'] / theirs['error']:.0%} | {default['error']:.2e} "
                         f"({1 - default['error'] / theirs['error']:.0%}) | "
                         f"{anywhere['sampler']}, {anywhere['grid']} | {anywhere['error']:.2e} |")
        lines.append("")
        lines.append(f"goal (ours >= 50% lower than k-diffusion's best on its grids at every budget 5-20): "
                     f"{'missed at ' + ', '.join(misses) if misses else 'met at every measured budget'}")
        lines.append("")
    lines.append(f"default pair: {default_sampler} on {default_grid} (worst error ratio to k-diffusion's best on its "
                 f"grids over "
                 f"NFE {SUMMARY_BUDGETS[0]}-{SUMMARY_BUDGETS[-1]} and both problems: {default_worst:.2f})")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["problems"]), figsize=(12, 4.5))
    for ax, (key, problem) in zip(np.atleast_1d(axes), results["problems"].items()):
        rows = problem["rows"]
        (default_sampler, default_grid), _ = choose_default(results)
        for impl, style in (("flaxdiff", "-o"), ("k-diffusion", "--s")):
            best = [best_rows(rows, impl, b) for b in BUDGETS]
            pts = [(b, r["error"]) for b, r in zip(BUDGETS, best) if r is not None]
            if pts:
                ax.loglog(*zip(*pts), style, label=f"{impl}: best (sampler, grid) per budget")
        for impl, name, grid, style in [("flaxdiff", default_sampler, default_grid, "-^"),
                                        ("flaxdiff", "dpmpp_2m", "logsnr_uniform", ":d"),
                                        ("k-diffusion", "lms", "karras", "--x"),
                                        ("k-diffusion", "dpmpp_2m", "karras", "--d")]:
            pts = sorted((r["budget"], r["error"]) for r in rows if (r["impl"], r["sampler"], r["grid"]) ==
                         (impl, name, grid))
            if pts:
                ax.loglog(*zip(*pts), style, label=f"{impl} {name} ({grid})")
        ax.set_title(f"{key} Gaussian mixture")
        ax.set_xlabel("NFE budget")
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
    parser.add_argument("--budgets", type=int, nargs="*", help="NFE budgets (default: 5-20 and 50)")
    parser.add_argument("--samplers", nargs="*", help="our registry names to run (default: all)")
    parser.add_argument("--problems", type=int, nargs="*", choices=(2, 64), default=[2, 64],
                        help="dimensions of the Gaussian-mixture problems to run (default: both)")
    args = parser.parse_args()
    if args.budgets:
        global BUDGETS, SUMMARY_BUDGETS
        BUDGETS = SUMMARY_BUDGETS = tuple(args.budgets)
    load_before = load_average()
    results = run(args)
    results["config"]["load_average_before_after"] = [load_before, load_average()]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(summarize(results))
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_average()}")


if __name__ == "__main__":
    main()
