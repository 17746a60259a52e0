"""Shared sampler battery: exact Gaussian solutions, convergence orders, NFE, retracing, seeds, schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import predictors, samplers, schedules, timesteps
from flaxdiff.predictors import EDMPredictor, noise_level
from flaxdiff.samplers.common import Multistep, sub_key

MU, S0 = 0.5, 0.7


def _sampler_cases(kind):
    """(name, options) of every registered sampler, from its declarations: ``deterministic_options`` or
    ``stochastic_options`` (the battery has no table of its own, so a new sampler joins it with no new code)."""
    return [(name, options) for name in samplers.available()
            for options in getattr(samplers.get(name), f"{kind}_options")]


DETERMINISTIC = _sampler_cases("deterministic")
STOCHASTIC = _sampler_cases("stochastic")
LOW_BUDGET = _sampler_cases("low_budget")


def _case_id(case):
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def _some_options(name):
    """Options that run sampler ``name``: its first deterministic form, else its first stochastic one."""
    sampler = samplers.get(name)
    return dict((sampler.deterministic_options or sampler.stochastic_options)[0])


def exact_denoiser(x, sigma):
    """Posterior mean for x0 ~ N(MU, S0^2 I) under VE noise of level sigma (shape (B,))."""
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return MU + S0**2 / (S0**2 + sigma**2) * (x - MU)


def exact_flow(x_start, s_start, s_end):
    """PF-ODE solution x(s) = MU + sqrt(S0^2 + s^2) / sqrt(S0^2 + s_start^2) (x_start - MU)."""
    return MU + np.sqrt(S0**2 + s_end**2) / np.sqrt(S0**2 + s_start**2) * (x_start - MU)


def exact_apply_fn(schedule, predictor):
    """A 'network' whose output is exactly the predictor's target for the Gaussian data."""

    def apply_fn(params, net_in, c_noise, cond):
        if isinstance(predictor, EDMPredictor):
            t = schedule.t_from_sigma_ratio(jnp.exp(4.0 * c_noise))
            level = noise_level(schedule, t)
            x_t = net_in / predictor.coefficients(level)[2].reshape(-1, 1)
        else:
            level = noise_level(schedule, c_noise / 1000.0)
            x_t = net_in
        alpha, sigma = level.alpha.reshape(-1, 1), level.sigma.reshape(-1, 1)
        x0 = exact_denoiser(x_t / alpha, (sigma / alpha)[:, 0])
        eps = (x_t - alpha * x0) / sigma
        return predictor.target(x0, eps, level)

    return apply_fn


@pytest.fixture(scope="module")
def noise():
    return jax.random.normal(jax.random.PRNGKey(0), (4096, 2))


def test_registry_lists_every_sampler_and_rejects_bad_names():
    expected = {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "rk4", "dpm_2", "dpmpp_2s_ancestral",
                "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc", "dpm_adaptive", "ipndm", "lms"}
    assert expected <= set(samplers.available())
    with pytest.raises(ValueError, match="unknown sampler 'nope'; available: .*dpmpp_2m"):
        samplers.get("nope")


@pytest.mark.parametrize("name, options, match", [
    ("ddim", {"eta": -0.5}, "eta=-0.5"),
    ("euler_ancestral", {"eta": -1.0}, "eta=-1.0"),
    ("unipc", {"solver_order": 4}, "solver_order=4"),
    ("ipndm", {"solver_order": 5}, "solver_order=5"),
    ("unipc", {"variant": "bh3"}, "variant='bh3'"),
    ("dpmpp_2m_sde", {"solver_type": "rk"}, "solver_type='rk'"),
    ("heun", {"bogus": 1}, "bad arguments for sampler 'heun'"),
])
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        samplers.get(name, **options)


def test_driver_errors(noise):
    with pytest.raises(ValueError, match="steps=0"):
        samplers.sample(exact_denoiser, noise, sampler="euler", steps=0)
    with pytest.raises(ValueError, match="not strictly decreasing"):
        samplers.sample(exact_denoiser, noise, sampler="euler", grid=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="unknown grid 'fancy'; available: .*karras"):
        samplers.sample(exact_denoiser, noise, sampler="euler", grid="fancy")
    with pytest.raises(ValueError, match="'ddpm' is stochastic"):
        samplers.sample(exact_denoiser, noise, sampler="ddpm")


ORDER_STEPS = (24, 48, 96)
ORDER_CASES = [case for case in DETERMINISTIC if not samplers.get(case[0]).accuracy_sweep]


def _endpoint_error(name, options, grid, start):
    x, _ = samplers.sample(exact_denoiser, start, sampler=name, grid=grid, **options)
    reference = exact_denoiser(exact_flow(start * grid[0], grid[0], grid[-2]), jnp.full((start.shape[0],), grid[-2]))
    return x, reference


@pytest.mark.parametrize("name, options", ORDER_CASES, ids=map(_case_id, ORDER_CASES))
def test_convergence_order_on_gaussian(x64, name, options):
    """Every deterministic form of every registered sampler: endpoint error against the closed-form PF-ODE solution
    on karras grids of 24, 48, 96 steps; the log-log slope is within 0.3 of the declared ``order`` (UniPC with its
    corrector gains one order over the predictor, Zhao et al. 2023, Thm 3.3), and at 48 steps the sampler reaches the
    exact solution (max error < 0.1 for first-order samplers, < 1e-2 otherwise)."""
    order = samplers.get(name, **options).order
    start = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
    errors = []
    for steps in ORDER_STEPS:
        x, reference = _endpoint_error(name, options, timesteps.karras(steps, 0.01, 40.0), start)
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
        if steps == 48:
            assert float(jnp.max(jnp.abs(x - reference))) < (0.1 if order == 1 else 1e-2)
    slope = -np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0]
    assert abs(slope - order) <= 0.3, (errors, slope)


ADAPTIVE_CASES = [name for name in samplers.available() if samplers.get(name).accuracy_sweep]


@pytest.mark.parametrize("name", ADAPTIVE_CASES)
def test_adaptive_samplers_reach_exact_solution_at_their_order(x64, name):
    """Samplers that choose their own steps: at the first deterministic options the max error is < 1e-2, and over the
    declared accuracy sweep the error falls at least as fast as NFE^-order (slope >= order - 0.3)."""
    sampler = samplers.get(name)
    start = jax.random.normal(jax.random.PRNGKey(2), (4, 3), jnp.float64)
    grid = timesteps.karras(48, 0.01, 40.0)
    x, reference = _endpoint_error(name, sampler.deterministic_options[0], grid, start)
    assert float(jnp.max(jnp.abs(x - reference))) < 1e-2
    nfes, errors = [], []
    for options in sampler.accuracy_sweep:
        x, nfe = samplers.sample(exact_denoiser, start, sampler=name, grid=grid, **options)
        nfes.append(int(nfe))
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert slope >= sampler.order - 0.3, (nfes, errors, slope)


WEAK_CASES = [case for case in STOCHASTIC if not samplers.get(case[0]).deterministic_options]


@pytest.mark.parametrize("name, options", WEAK_CASES, ids=map(_case_id, WEAK_CASES))
def test_weak_order_of_always_stochastic_samplers(name, options):
    """A sampler with no deterministic form: the bias of its output std against the exact law of D(x_s, s),
    x_s ~ N(MU, S0^2 + s^2), i.e. std S0^2 / sqrt(S0^2 + s^2), falls like N^-order (16 and 64 karras steps,
    65536 samples: Monte Carlo error ~0.002 against a bias > 0.03)."""
    order = samplers.get(name, **options).order
    noise = jax.random.normal(jax.random.PRNGKey(0), (1 << 16, 1))
    biases = []
    for steps in (16, 64):
        grid = timesteps.karras(steps, 0.02, 20.0)
        x, _ = samplers.sample(exact_denoiser, noise, sampler=name, grid=grid, key=jax.random.PRNGKey(3), **options)
        biases.append(abs(float(x.std()) - S0**2 / np.sqrt(S0**2 + grid[-2] ** 2)))
    slope = np.log(biases[0] / biases[1]) / np.log(4.0)
    assert abs(slope - order) <= 0.3, (biases, slope)


def test_every_registered_sampler_has_its_order_measured():
    """Guard: each registry member declares an order >= 1 and at least one battery test measures it."""
    measured = {name for name, _ in ORDER_CASES} | set(ADAPTIVE_CASES) | {name for name, _ in WEAK_CASES}
    assert measured == set(samplers.available())
    for name in samplers.available():
        assert samplers.get(name).order >= 1, name


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=map(_case_id, STOCHASTIC))
def test_stochastic_samplers_match_gaussian_moments(noise, name, options):
    """100 karras steps, 4096 x 2 samples: mean within 0.03; std within 0.03 (0.06 for first-order SDE steps,
    whose O(1/N) variance bias is about -0.04 here)."""
    key = jax.random.PRNGKey(3)
    x, _ = samplers.sample(exact_denoiser, noise, sampler=name, steps=100, grid="karras", key=key, **options)
    assert abs(float(x.mean()) - MU) < 0.03
    assert abs(float(x.std()) - S0) < (0.06 if samplers.get(name, **options).order == 1 else 0.03)
    again, _ = samplers.sample(exact_denoiser, noise, sampler=name, steps=100, grid="karras", key=key, **options)
    other, _ = samplers.sample(exact_denoiser, noise, sampler=name, steps=100, grid="karras",
                               key=jax.random.PRNGKey(4), **options)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(again))
    assert float(jnp.max(jnp.abs(x - other))) > 1e-2


SCHEDULE_PREDICTOR = [
    (schedules.get("cosine"), predictors.get("epsilon")),
    (schedules.get("ve", sigma_min=0.002, sigma_max=80.0), predictors.get("edm")),
    (schedules.get("rectified_flow"), predictors.get("velocity")),
    (schedules.get("cosine_continuous"), predictors.get("v")),
]


@pytest.mark.parametrize("name", samplers.available())
def test_every_sampler_on_every_schedule_family(noise, name):
    """Through sample_model with an exact network: same answer as the plain VE run on the same grid."""
    options = _some_options(name)
    key = jax.random.PRNGKey(5)
    grid = timesteps.karras(12, 0.01, 80.0)
    plain, nfe_plain = samplers.sample(exact_denoiser, noise[:64], sampler=name, grid=grid, key=key, **options)
    for schedule, predictor in SCHEDULE_PREDICTOR:
        x, nfe = samplers.sample_model(exact_apply_fn(schedule, predictor), None, schedule, predictor,
                                       noise=noise[:64], sampler=name, grid=grid, key=key, **options)
        assert int(nfe) == int(nfe_plain)
        np.testing.assert_allclose(np.asarray(x), np.asarray(plain), atol=2e-3, err_msg=f"{schedule}, {predictor}")


def test_zero_terminal_snr_schedule_starts_at_capped_sigma(noise):
    schedule = schedules.get("rectified_flow")
    grid = timesteps.get("karras", 30, schedule=schedule)
    assert grid[0] == pytest.approx(timesteps.SIGMA_RATIO_CAP) and grid[-1] == 0.0 and grid[-2] > 0
    x, _ = samplers.sample_model(exact_apply_fn(schedule, predictors.get("velocity")), None, schedule, "velocity",
                                 noise=noise[:64], sampler="heun", steps=30, grid="karras")
    reference = exact_denoiser(exact_flow(noise[:64] * grid[0], grid[0], grid[-2]), jnp.full((64,), grid[-2]))
    assert float(jnp.sqrt(jnp.mean((x - reference) ** 2))) < 0.05


@pytest.mark.parametrize("name", samplers.available())
def test_nfe_equals_counted_denoiser_calls(name):
    calls = []

    def counting(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return exact_denoiser(x, sigma)

    options = _some_options(name)
    x, nfe = samplers.sample(counting, jnp.ones((2, 3)), sampler=name, steps=5, key=jax.random.PRNGKey(0),
                             **options)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert len(calls) == int(nfe) > 0
    if not samplers.get(name).accuracy_sweep:
        assert int(nfe) == samplers.get(name).nfe_per_step * 4 + 1


@pytest.mark.parametrize("name, options", LOW_BUDGET, ids=map(_case_id, LOW_BUDGET))
def test_low_budget_forms_count_their_evaluations(x64, name, options):
    """Every declared low-budget form: the counted denoiser calls equal the returned NFE, and the analytical first
    step calls the network at none of the first level s_0, i.e. N - 1 calls on a grid of N intervals."""
    levels = []

    def counting(x, sigma):
        jax.debug.callback(lambda s: levels.append(float(s[0])), sigma)
        return exact_denoiser(x, sigma)

    grid = timesteps.karras(5, 0.01, 80.0)
    x, nfe = samplers.sample(counting, jnp.ones((2, 3)), sampler=name, grid=grid, **options)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert len(levels) == int(nfe) == samplers.get(name).nfe_per_step * 4
    assert sorted(levels, reverse=True) == pytest.approx(list(grid[1:-1]))


@pytest.mark.parametrize("name", [name for name, options in LOW_BUDGET if options == {"analytic_first_step": True}])
def test_analytic_first_step_is_the_large_noise_limit(x64, name):
    """The analytical first step replaces D(x, s_0) by its large-noise limit 0 and changes nothing else: with a
    denoiser that is exactly 0 above s = 50 (and the centred Gaussian's posterior mean below), the run with it equals
    the plain run to rounding (karras grid, solver order 4: every warm-up order), with one evaluation fewer; on the
    8-Gaussian ring at 5 NFE on time_quadratic (plain: 5 intervals; analytic first step: 6) its error is lower."""
    def cut_denoiser(x, sigma):
        return jnp.where(sigma[:, None] > 50.0, 0.0, S0**2 / (S0**2 + sigma[:, None] ** 2) * x)

    start = jax.random.normal(jax.random.PRNGKey(3), (8, 3), jnp.float64)
    grid = timesteps.karras(7, 0.01, 80.0)
    plain, nfe_plain = samplers.sample(cut_denoiser, start, sampler=name, grid=grid, solver_order=4)
    analytic, nfe = samplers.sample(cut_denoiser, start, sampler=name, grid=grid, solver_order=4,
                                    analytic_first_step=True)
    assert int(nfe) == int(nfe_plain) - 1
    np.testing.assert_allclose(np.asarray(analytic), np.asarray(plain), rtol=0, atol=1e-12)
    ring_start = jax.random.normal(jax.random.PRNGKey(0), (256, 2), jnp.float64)
    reference, _ = samplers.sample(_ring_denoiser, ring_start, sampler="rk4", grid=timesteps.karras(200, 0.002, 80.0))
    errors = []
    for steps, options in ((5, {}), (6, {"analytic_first_step": True})):
        x, nfe = samplers.sample(_ring_denoiser, ring_start, sampler=name, steps=steps, grid="time_quadratic",
                                 sigma_min=0.002, sigma_max=80.0, **options)
        assert int(nfe) == 5
        errors.append(float(jnp.sqrt(jnp.mean((x - reference) ** 2))))
    assert errors[1] < 0.8 * errors[0], errors


def test_sampling_compiles_once_per_shape():
    traces = []

    def tracing(x, sigma):
        traces.append(1)
        return exact_denoiser(x, sigma)

    counts = []
    for seed in range(3):
        x = jax.random.normal(jax.random.PRNGKey(seed), (8, 2))
        samplers.sample(tracing, x, sampler="dpmpp_2m", steps=7, grid="karras", sigma_max=50.0 + seed)
        counts.append(len(traces))
    assert counts[0] > 0 and counts == [counts[0]] * 3


def test_per_sample_seeds_do_not_depend_on_batch():
    schedule, predictor = schedules.get("cosine"), predictors.get("epsilon")
    apply_fn = exact_apply_fn(schedule, predictor)
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    batch, _ = samplers.sample_model(apply_fn, None, schedule, predictor, sampler="euler_ancestral", steps=6,
                                     sample_keys=keys, shape=(8, 3))
    for i in (0, 5):
        single, _ = samplers.sample_model(apply_fn, None, schedule, predictor, sampler="euler_ancestral", steps=6,
                                          sample_keys=keys[i:i + 1], shape=(1, 3))
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(batch[i]), rtol=1e-6, atol=1e-6)


def test_img2img_runs_the_tail_of_the_grid(noise):
    schedule, predictor = schedules.get("ve", sigma_min=0.002, sigma_max=80.0), predictors.get("x0")
    init = jnp.full((16, 2), 2.0)
    x, nfe = samplers.sample_model(exact_apply_fn(schedule, predictor), None, schedule, predictor,
                                   noise=noise[:16], sampler="euler", steps=10, grid="karras", init_image=init,
                                   strength=0.3)
    assert int(nfe) == 3
    grid = timesteps.karras(10, 0.002, 80.0)[7:]
    expected, _ = samplers.run(samplers.get("euler"), lambda x_, s: exact_denoiser(x_, jnp.full((16,), s)),
                               init + grid[0] * noise[:16], jnp.asarray(grid, jnp.float32), None, True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strength=1.5"):
        samplers.sample_model(exact_apply_fn(schedule, predictor), None, schedule, predictor, noise=noise[:16],
                              init_image=init, strength=1.5)


def test_per_sample_keys_fold_in_row_wise():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    folded = sub_key(keys, 4)
    np.testing.assert_array_equal(np.asarray(folded[1]), np.asarray(jax.random.fold_in(keys[1], 4)))


def test_churn_outside_its_window_stays_finite():
    """Churn with s_tmin above the last levels (gamma = 0 there) adds no noise and never NaN. Run in a fresh
    process with XLA's default optimisation level (the suite compiles at level 0, where the old rounding-negative
    sqrt(s_hat^2 - s^2) did not show)."""
    import os
    import subprocess
    import sys

    script = (
        "import jax, jax.numpy as jnp\n"
        "from flaxdiff import samplers\n"
        "noise = jax.random.normal(jax.random.key(1), (16, 2))\n"
        "for name in ('euler', 'heun'):\n"
        "    x, _ = samplers.sample(lambda x, s: x / (1 + s[:, None] ** 2), noise, sampler=name, steps=4,\n"
        "                           grid='karras', key=jax.random.key(0), s_churn=1.0, s_tmin=0.05)\n"
        "    assert bool(jnp.all(jnp.isfinite(x))), name\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _curved_denoiser(x, sigma, lib):
    """A smooth nonlinear D(x, s) (the Gaussian posterior mean plus a tanh bend), written for jnp and torch alike."""
    c = S0**2 / (S0**2 + sigma**2)
    return MU + c * (x - MU) + 0.1 * lib.tanh(x) / (1.0 + sigma**2)


@pytest.mark.parametrize("solver_order, variant, steps, final", [(3, "bh2", 8, "zero"), (3, "bh2", 5, "zero"),
                                                                (2, "bh1", 6, "sigma_min"), (3, "bh1", 7, "sigma_min")])
def test_unipc_matches_diffusers(x64, solver_order, variant, steps, final):
    """UniPC against diffusers' UniPCMultistepScheduler in float64 on the same grid (its sigmas: ending in 0, or at
    the last training level with final_sigmas_type="sigma_min", as diffusers' bh1 step into 0 is 0 * inf = nan),
    same order and lower order on the final steps (our extrapolation guard off: diffusers has none): endpoints within
    1e-6. diffusers runs in VP coordinates,
    x_t = alpha x~ with alpha = 1 / sqrt(1 + s^2), and its model returns x0 = D(x_t / alpha, s)."""
    import torch
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=solver_order, solver_type=variant,
                                        prediction_type="sample", predict_x0=True, lower_order_final=True,
                                        final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    sigmas = scheduler.sigmas.numpy()
    noise = np.random.default_rng(0).normal(size=(6, 3))
    sample = torch.tensor(noise * sigmas[0] / np.sqrt(1.0 + sigmas[0] ** 2))
    for i, t in enumerate(scheduler.timesteps):
        alpha = 1.0 / np.sqrt(1.0 + sigmas[i] ** 2)
        x0 = _curved_denoiser(sample / alpha, float(sigmas[i]), torch)
        sample = scheduler.step(x0, t, sample).prev_sample
    ours, nfe = samplers.sample(lambda x, s: _curved_denoiser(x, s[:, None], jnp), jnp.asarray(noise),
                                sampler="unipc", grid=sigmas, solver_order=solver_order, variant=variant,
                                max_step_growth=float("inf"), max_step=float("inf"))
    assert int(nfe) == steps
    expected = sample.numpy() * np.sqrt(1.0 + sigmas[-1] ** 2)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-6)


THIRD_ORDER_MULTISTEP = [name for name in samplers.available() if isinstance(samplers.get(name), Multistep)
                         and samplers.get(name, **samplers.get(name).deterministic_options[0]).solver_order >= 3]
# Their first deterministic form and every declared low-budget form.
THIRD_ORDER_CASES = [(name, options) for name in THIRD_ORDER_MULTISTEP
                     for options in samplers.get(name).deterministic_options[:1] + samplers.get(name).low_budget_options]


def _ring_denoiser(x, sigma):
    """Exact D for 8 equal Gaussians (std 0.15) on the circle of radius 2 under VE noise s (shape (B,))."""
    angles = jnp.arange(8) * (2 * jnp.pi / 8)
    means = 2.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], 1)
    var = 0.15**2 + sigma[:, None] ** 2
    logits = -0.5 * jnp.sum((x[:, None, :] - means[None]) ** 2, -1) / var
    post = means[None] + (0.15**2 / var)[:, :, None] * (x[:, None, :] - means[None])
    return jnp.einsum("bk,bkd->bd", jax.nn.softmax(logits, -1), post)


@pytest.mark.parametrize("nfe", [5, 6, 8, 10, 20])  # one test per grid length: ~36 compiles, split for pytest-xdist
def test_third_order_multistep_samplers_are_stable_on_every_grid(noise, nfe):
    """Every third-order multistep sampler (solver_order >= 3 in its first deterministic form, and its low-budget
    forms) on every registered grid of 5, 6, 8, 10, 20 intervals on a 2-D ring of 8 Gaussians: endpoint RMS error
    against the converged ODE solution (RK4 on 400 log-spaced levels to the same last level) at most twice that of
    the first-order step (Euler = DDIM) on the same grid. With the lower final order but without the extrapolation guard UniPC reached 7x
    and DPM-Solver++(3M) 12x Euler's error here (flow_shift, NFE 8)."""
    start = noise[:256]
    ratios = {}
    for grid_name in timesteps.available():
        grid = timesteps.get(grid_name, nfe, sigma_min=0.002, sigma_max=80.0)
        fine = np.concatenate([np.geomspace(grid[0], grid[-2], 400), [0.0]])
        reference, _ = samplers.sample(_ring_denoiser, start, sampler="rk4", grid=fine)
        euler, _ = samplers.sample(_ring_denoiser, start, sampler="euler", grid=grid)
        euler_error = float(jnp.sqrt(jnp.mean((euler - reference) ** 2)))
        for name, options in THIRD_ORDER_CASES:
            x, _ = samplers.sample(_ring_denoiser, start, sampler=name, grid=grid, **options)
            ratios[_case_id((name, options)), grid_name, nfe] = (float(jnp.sqrt(jnp.mean((x - reference) ** 2)))
                                                                 / euler_error)
    assert {name for name, _, _ in ratios} >= {"unipc", "dpmpp_3m_sde-eta=0.0", "ipndm", "lms",
                                               "ipndm-analytic_first_step=True"}
    assert max(ratios.values()) <= 2.0, sorted(ratios.items(), key=lambda item: -item[1])[:5]


def test_repeated_model_sampling_does_not_recompile():
    """sample_model at the default sampler and grid with classifier-free guidance, called again with new params,
    noise key, labels and guidance scale (same shapes): the first call compiles, later calls compile nothing
    (counted with jax.monitoring's backend-compile events)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    schedule, predictor = schedules.get("cosine"), predictors.get("epsilon")
    apply_fn = exact_apply_fn(schedule, predictor)
    counts = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in range(3):
            x, _ = samplers.sample_model(apply_fn, {"w": jnp.full((3,), float(seed))}, schedule, predictor, steps=9,
                                         shape=(5, 3), key=jax.random.PRNGKey(seed),
                                         cond={"label": jnp.arange(5) + seed}, guidance_scale=1.5 + seed,
                                         null_cond={"label": jnp.full((5,), 10)})
            jax.block_until_ready(x)
            counts.append(len(compiles))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts
