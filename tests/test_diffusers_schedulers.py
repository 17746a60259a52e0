"""diffusers scheduler configs as flaxdiff schedule + predictor + sampler + grid: the tables and grids equal
diffusers', and flaxdiff's DDIM / Euler / Euler ancestral / DPM-Solver++(2M) reproduce DDIMScheduler,
EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and DPMSolverMultistepScheduler latents from the same
noise (epsilon and v-prediction) with the same network function on both sides."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from flaxdiff import schedules
from flaxdiff.interop.diffusers_scheduler import DiffusersScheduler, sample, sigma_to_timestep

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CHANNEL = np.linspace(-1.0, 1.0, 4, dtype=np.float32).reshape(1, 4, 1, 1)
STEPS = 8


def torch_network(x, timestep):
    """A fixed nonlinear function of (x_t, k): the same "network" on both sides."""
    return torch.tanh(0.8 * x) + 0.3 * torch.sin(0.004 * timestep.float() + torch.from_numpy(CHANNEL))


def jax_network(params, x, timesteps, cond):
    return jnp.tanh(0.8 * x) + 0.3 * jnp.sin(0.004 * timesteps.reshape(-1, 1, 1, 1) + jnp.asarray(CHANNEL))


def _diffusers_loop(scheduler, noise, steps):
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, timestep)
        latents = scheduler.step(torch_network(model_input, timestep), timestep, latents).prev_sample
    return latents.numpy()


CASES = {
    # Stable Diffusion 1.x / 2.x scheduler_config.json fields
    "ddim_sd": ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                      timestep_spacing="leading")),
    "ddim_trailing_to_zero": ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing")),
    "euler_leading": ("EulerDiscreteScheduler", dict(SD, steps_offset=1, timestep_spacing="leading")),
    "euler_linspace_sigma_min": ("EulerDiscreteScheduler", dict(SD, final_sigmas_type="sigma_min")),
    "euler_karras": ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="leading",
                                                    steps_offset=1)),
    "euler_trailing_zero_snr": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing",
                                                               rescale_betas_zero_snr=True)),
    "dpm_leading": ("DPMSolverMultistepScheduler", dict(SD, steps_offset=1, timestep_spacing="leading")),
    "dpm_karras": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    "dpm_linspace_sigma_min": ("DPMSolverMultistepScheduler", dict(SD, final_sigmas_type="sigma_min")),
    "dpm_trailing_cosine": ("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2",
                                                              timestep_spacing="trailing")),
}


# Zero terminal SNR is only meaningful with v-prediction (epsilon cannot give x0 where alpha_bar = 0); the cosine
# table reaches s = 637, where this stand-in epsilon network (not a denoiser) drives the latents to 1e4, beyond
# float32's 1e-4 absolute resolution, so both run with v-prediction.
PARITY = [(case, prediction) for case in sorted(CASES) for prediction in ("epsilon", "v_prediction")
          if not (case.endswith(("zero_snr", "cosine")) and prediction == "epsilon")]


@pytest.mark.parametrize("case,prediction_type", PARITY)
def test_deterministic_schedulers_match_diffusers(case, prediction_type):
    class_name, config = CASES[case]
    config = dict(config, prediction_type=prediction_type)
    noise = np.random.RandomState(0).randn(2, 4, 8, 8).astype(np.float32)
    expected = _diffusers_loop(getattr(diffusers, class_name)(**config), noise, STEPS)
    scheduler = DiffusersScheduler.from_config({"_class_name": class_name, **config})
    out = sample(jax_network, scheduler, noise, STEPS, cond=None)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers_with_fixed_noise(prediction_type, monkeypatch):
    config = dict(SD, prediction_type=prediction_type, timestep_spacing="trailing")
    noise = np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32)
    key = jax.random.key(3)
    # flaxdiff's step i draws N(0, I) from fold_in(fold_in(key, 1), i) (flaxdiff.samplers.common.Sampler.run)
    step_noise = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), i), noise.shape))
                  for i in range(STEPS - 1)] + [np.zeros_like(noise)]
    draws = iter(step_noise)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda shape, **kwargs: torch.from_numpy(next(draws)))
    expected = _diffusers_loop(diffusers.EulerAncestralDiscreteScheduler(**config), noise, STEPS)
    scheduler = DiffusersScheduler.from_config({"_class_name": "EulerAncestralDiscreteScheduler", **config})
    assert scheduler.sampler == "euler_ancestral"
    out = sample(jax_network, scheduler, noise, STEPS, cond=None, key=key)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)
    deterministic = sample(jax_network, scheduler, noise, STEPS, cond=None, sampler="euler")
    assert np.abs(np.asarray(deterministic) - expected).max() > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_grid_is_the_diffusers_grid(case):
    class_name, config = CASES[case]
    reference = getattr(diffusers, class_name)(**config)
    reference.set_timesteps(STEPS)
    grid = DiffusersScheduler.from_config({"_class_name": class_name, **config}).grid(STEPS)
    reference_timesteps = reference.timesteps.numpy()
    if case == "euler_linspace_sigma_min":
        # diffusers' last step goes from s_min (k = 0) to s_min, the identity; a grid is strictly decreasing
        assert reference.sigmas[-2] == reference.sigmas[-1] and len(grid.timesteps) == STEPS - 1
        reference.sigmas, reference_timesteps = reference.sigmas[:-1], reference_timesteps[:-1]
    np.testing.assert_allclose(grid.timesteps, reference_timesteps, atol=2e-3 if "karras" in case else 0)
    if class_name == "DDIMScheduler":
        table = reference.alphas_cumprod.numpy().astype(np.float64)
        final = 1.0 if reference.config.set_alpha_to_one else table[0]
        alpha_bar = np.concatenate([table[reference.timesteps.numpy()], [final]])
        expected = np.sqrt((1 - alpha_bar) / alpha_bar)
    else:
        expected = reference.sigmas.numpy()
    np.testing.assert_allclose(grid.sigmas, expected, rtol=2e-5, atol=0)


def test_schedule_and_predictor_mapping():
    for beta_schedule, kind in (("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                ("squaredcos_cap_v2", "cosine")):
        for zero_snr in (False, True):
            config = dict(SD, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
            mapped = DiffusersScheduler.from_config({"_class_name": "DDIMScheduler", **config})
            assert mapped.schedule.name == kind and mapped.schedule.zero_terminal_snr == zero_snr
            reference = diffusers.DDIMScheduler(**config).alphas_cumprod.numpy().astype(np.float64)
            np.testing.assert_allclose(mapped.schedule.alphas_cumprod(), reference, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(mapped.alphas_cumprod(), reference, rtol=1e-4, atol=1e-7)
    names = {prediction: DiffusersScheduler.from_config({"prediction_type": prediction}).predictor.name
             for prediction in ("epsilon", "v_prediction", "sample")}
    assert names == {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
    assert DiffusersScheduler.from_config({"_class_name": "PNDMScheduler", **SD}).sampler == "dpmpp_2m"


def test_scaled_linear_schedule_is_stable_diffusions():
    schedule = schedules.get("scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = schedule.betas()
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000), rtol=1e-12)
    assert schedule.alphas_cumprod()[-1] == pytest.approx(np.prod(1.0 - betas), rel=1e-12)
    t = jnp.asarray([1, 500, 1000], jnp.float32) / 1000
    np.testing.assert_allclose(np.asarray(schedule.alpha(t)) ** 2, schedule.alphas_cumprod()[[0, 499, 999]], rtol=1e-5)
    with pytest.raises(ValueError, match="beta_start=0.02 must not exceed beta_end=0.01"):
        schedules.get("scaled_linear", beta_start=0.02, beta_end=0.01)


def test_sigma_to_timestep_inverts_the_table():
    table = DiffusersScheduler.from_config(SD).sigma_table()
    mid = np.exp(0.25 * np.log(table[10]) + 0.75 * np.log(table[11]))
    levels = np.asarray([table[0], table[17], table[998], mid, 1e-6, 1e6], np.float32)
    found = jax.jit(sigma_to_timestep)(jnp.asarray(levels), jnp.log(jnp.asarray(table)))
    np.testing.assert_allclose(np.asarray(found), [0, 17, 998, 10.75, 0, 999], atol=1e-3)


def test_other_samplers_and_grids_run_on_the_mapping():
    scheduler = DiffusersScheduler.from_config({"_class_name": "EulerDiscreteScheduler", **SD})
    noise = np.random.RandomState(2).randn(1, 4, 8, 8).astype(np.float32)
    reference = np.asarray(sample(jax_network, scheduler, noise, 30, cond=None, sampler="heun"))
    for sampler, grid in (("dpmpp_2m", "karras"), ("euler", None), ("heun", "logsnr_uniform")):
        out = np.asarray(sample(jax_network, scheduler, noise, 12, cond=None, sampler=sampler, grid=grid))
        assert np.isfinite(out).all()
        assert np.abs(out - reference).max() < 0.1 * np.abs(reference).max()


def test_guidance_on_the_mapped_denoiser():
    """x0 = x0_u + w (x0_c - x0_u) in one batched forward; w = 1 and an empty guidance interval are unguided."""
    def network(params, x, timesteps, cond):
        return jax_network(params, x, timesteps, cond) + 0.2 * cond["shift"].reshape(-1, 1, 1, 1)

    scheduler = DiffusersScheduler.from_config({"_class_name": "DDIMScheduler", **SD, "clip_sample": False})
    noise = np.random.RandomState(3).randn(2, 4, 8, 8).astype(np.float32)
    cond, null = {"shift": jnp.ones((2,))}, {"shift": jnp.zeros((1,))}
    plain = np.asarray(sample(network, scheduler, noise, STEPS, cond))
    for scale, interval in ((1.0, None), (3.0, (0.0, 0.0))):
        guided = sample(network, scheduler, noise, STEPS, cond, guidance_scale=scale, null_cond=null,
                        guidance_interval=interval)
        np.testing.assert_allclose(np.asarray(guided), plain, atol=1e-5)
    # w = 3: F_u + 3 (F_c - F_u) = base + 3 * 0.2, which is the unguided network with shift 3
    strong = sample(network, scheduler, noise, STEPS, cond, guidance_scale=3.0, null_cond=null)
    shifted = sample(network, scheduler, noise, STEPS, {"shift": 3.0 * jnp.ones((2,))})
    np.testing.assert_allclose(np.asarray(strong), np.asarray(shifted), atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale needs null_cond"):
        sample(network, scheduler, noise, STEPS, cond, guidance_scale=2.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_toolkit_sample_model_runs_the_mapped_schedule_and_predictor(prediction_type):
    """The toolkit's own path (sample_model with the mapped DiscreteVPSchedule + predictor and the convention
    timestep k = c_noise T / 1000 - 1) lands on diffusers' DPM-Solver++ result; only the timestep of a level is
    interpolated differently (linear in alpha_bar instead of diffusers' table lookup)."""
    from flaxdiff import samplers

    config = {"_class_name": "DPMSolverMultistepScheduler", **SD, "prediction_type": prediction_type}
    scheduler = DiffusersScheduler.from_config(config)
    grid = scheduler.grid(STEPS)
    noise = np.random.RandomState(4).randn(2, 4, 8, 8).astype(np.float32)
    expected = _diffusers_loop(diffusers.DPMSolverMultistepScheduler(**config), noise, STEPS)

    def apply_fn(params, x, c_noise, cond):
        return jax_network(params, x, c_noise * (scheduler.num_train_timesteps / 1000.0) - 1.0, cond)

    start = noise * np.float32(grid.start_scale / grid.sigmas[0])
    out, _ = samplers.sample_model(apply_fn, None, scheduler.schedule, scheduler.predictor, noise=start,
                                   sampler="dpmpp_2m", grid=grid.sigmas, **scheduler.sampler_options(STEPS))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-3 * np.abs(expected).max())


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"beta_schedule='sigmoid'; supported: linear, scaled_linear, "
                                         r"squaredcos_cap_v2"):
        DiffusersScheduler.from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match=r"prediction_type='flow_prediction'"):
        DiffusersScheduler.from_config({"prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match=r"algorithm_type='sde-dpmsolver\+\+'"):
        DiffusersScheduler.from_config({"_class_name": "DPMSolverMultistepScheduler",
                                        "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match=r"use_exponential_sigmas=True is not supported; accepted: False"):
        DiffusersScheduler.from_config({"use_exponential_sigmas": True})
    ddim = DiffusersScheduler.from_config({"_class_name": "DDIMScheduler", "timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match=r"DDIM with timestep_spacing='linspace' and steps=7"):
        ddim.grid(7)
    with pytest.raises(ValueError, match=r"steps=0 must be an integer in \[1, 1000\]"):
        ddim.grid(0)
