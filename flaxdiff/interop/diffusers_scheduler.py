"""A diffusers ``scheduler_config.json`` as configuration of this toolkit: schedule + predictor + sampler + grid.

    scheduler = DiffusersScheduler.from_pretrained("sd15/scheduler")   # or .from_config(dict)
    scheduler.schedule       # DiscreteVPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.predictor      # the "epsilon" / "v" / "x0" predictor
    scheduler.sampler        # "ddim", "euler", "euler_ancestral" or "dpmpp_2m" (any registered sampler may be used)
    grid = scheduler.grid(steps)   # the levels s_i and diffusers timesteps k_i the diffusers scheduler would visit
    latents = sample(model_fn, scheduler, noise, steps, cond)           # the diffusers loop, run by flaxdiff

Levels are VE-equivalent noise levels s = sigma / alpha = sqrt((1 - alpha_bar) / alpha_bar) of diffusers' float32
alpha_bar table (exactly the ``sigmas`` of its Euler / DPM schedulers); x~ = x_t / alpha. The mapping:

    field                    flaxdiff
    beta_schedule            DiscreteVPSchedule kind: linear -> "linear", scaled_linear -> "scaled_linear",
                             squaredcos_cap_v2 -> "cosine" (offset 0.008, max_beta 0.999)
    rescale_betas_zero_snr   zero_terminal_snr=True (Euler / DPM: alpha_bar_T = 2^-24, as diffusers does)
    prediction_type          epsilon -> "epsilon", v_prediction -> "v", sample -> "x0"
    timestep_spacing         the scheduler class's own timesteps k_i (leading / trailing / linspace), + steps_offset
    final_sigmas_type        "zero" -> the grid ends at s = 0; "sigma_min" -> ends at s(alpha_bar_0)
    use_karras_sigmas        Karras rho = 7 levels; timesteps by diffusers' log-sigma interpolation (rounded by DPM)
    set_alpha_to_one (DDIM)  true -> the last step goes to s = 0, false -> to s(alpha_bar_0)

The denoiser conditions the network on the diffusers timestep of each level: the exact k_i for grid levels, and
log-sigma interpolation of the training table for other levels (intermediate stages of multi-stage samplers, or
a flaxdiff grid name such as "karras" / "logsnr_uniform"). Starting point: DDIM / DPM / Euler "leading" start at
x_t = noise, i.e. x~_0 = sqrt(1 + s_0^2) noise; Euler "linspace" / "trailing" at x~_0 = s_0 noise (diffusers'
``init_noise_sigma``). Output: DDIM / DPM return x_t = alpha x~ at the last level, Euler returns x~ (both are the
denoised x0 when the grid ends at 0).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxdiff import guidance as guidance_lib
from flaxdiff import predictors as predictors_lib
from flaxdiff import samplers as samplers_lib
from flaxdiff import timesteps as timesteps_lib
from flaxdiff.schedules import DiscreteVPSchedule

logger = logging.getLogger(__name__)

Array = jax.Array
# model_fn(x_t, timesteps (B,), cond) -> raw network output F (epsilon, v or x0), the diffusers call convention.
ModelFn = Callable[[Array, Array, Any], Array]

__all__ = [
    "SAMPLER_OF_CLASS",
    "SCHEDULER_FILE",
    "DiffusersGrid",
    "DiffusersScheduler",
    "make_denoiser",
    "sample",
    "sigma_to_timestep",
]

SCHEDULER_FILE = "scheduler_config.json"
# diffusers scheduler class -> the flaxdiff sampler that reproduces it; other classes (PNDM, LMS, UniPC, ...) keep
# their noise schedule and prediction type and run with DEFAULT_SAMPLER on the Euler / DPM grid rules.
SAMPLER_OF_CLASS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
DEFAULT_SAMPLER = "dpmpp_2m"
_GRID_FAMILY = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                "EulerAncestralDiscreteScheduler": "euler", "DPMSolverMultistepScheduler": "dpm"}
_BETA_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTORS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' per-class defaults of the fields read here.
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0, "rescale_betas_zero_snr": False,
           "timestep_spacing": "linspace", "final_sigmas_type": "zero", "use_karras_sigmas": False,
           "set_alpha_to_one": True, "clip_sample": False, "thresholding": False, "solver_order": 2,
           "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
           "euler_at_final": False, "interpolation_type": "linear", "timestep_type": "discrete",
           "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
           "use_flow_sigmas": False, "lambda_min_clipped": -math.inf, "variance_type": None}
_CLASS_DEFAULTS = {"DDIMScheduler": {"timestep_spacing": "leading", "clip_sample": True},
                   "PNDMScheduler": {"timestep_spacing": "leading"}}
# Fields whose non-default values the mapping cannot reproduce.
_UNSUPPORTED = ("trained_betas", "thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "use_flow_sigmas", "euler_at_final")


@dataclasses.dataclass(frozen=True)
class DiffusersGrid:
    """The levels a diffusers scheduler visits, in flaxdiff's terms.

    sigmas: s_0 > ... > s_N (float64 holding diffusers' float32 values), s_N = 0 or the final level;
    timesteps: the diffusers timestep k_i of every level s_i > 0 (what the network is conditioned on);
    start_scale: x~_0 = start_scale * noise; native_output: the scheduler returns x_t = alpha x~ (DDIM, DPM) rather
    than x~ (Euler) at the last level.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    start_scale: float
    native_output: bool


def _karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_timestep_np(sigmas: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t`` in numpy: piecewise-linear interpolation of the index k in log s."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, log_table.shape[0] - 2)
    weight = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return (1.0 - weight) * low + weight * (low + 1)


def sigma_to_timestep(sigma: Array, log_table: Array) -> Array:
    """The diffusers timestep of level s: with l_k = log s_k of the training table (increasing in k) and
    l_j <= log s < l_{j+1}, k = j + w, w = clip((l_j - log s) / (l_j - l_{j+1}), 0, 1) (clamped at the ends)."""
    log_sigma = jnp.log(jnp.maximum(sigma.astype(jnp.float32), 1e-10))
    low = jnp.clip(jnp.searchsorted(log_table, log_sigma, side="right") - 1, 0, log_table.shape[0] - 2)
    weight = jnp.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return (1.0 - weight) * low + weight * (low + 1)


@dataclasses.dataclass(frozen=True)
class DiffusersScheduler:
    """A parsed diffusers scheduler config; see the module docstring for the mapping."""

    class_name: str
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False
    set_alpha_to_one: bool = True
    lower_order_final: bool = True

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> DiffusersScheduler:
        """Parse a ``scheduler_config.json`` dict; ValueError naming the first value the mapping cannot reproduce."""
        class_name = str(values.get("_class_name", "DDIMScheduler"))
        cfg = {**_COMMON, **_CLASS_DEFAULTS.get(class_name, {}), **values}
        if cfg["beta_schedule"] not in _BETA_KINDS:
            raise ValueError(f"scheduler beta_schedule={cfg['beta_schedule']!r}; supported: {', '.join(_BETA_KINDS)}")
        if cfg["prediction_type"] not in _PREDICTORS:
            raise ValueError(f"scheduler prediction_type={cfg['prediction_type']!r}; supported: "
                             f"{', '.join(_PREDICTORS)}")
        if cfg["timestep_spacing"] not in _SPACINGS:
            raise ValueError(f"scheduler timestep_spacing={cfg['timestep_spacing']!r}; supported: "
                             f"{', '.join(_SPACINGS)}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"scheduler final_sigmas_type={cfg['final_sigmas_type']!r}; supported: 'zero', "
                             f"'sigma_min'")
        for field in _UNSUPPORTED:
            if cfg[field] != _COMMON[field] and cfg[field] is not None and cfg[field] is not False:
                raise ValueError(f"scheduler {field}={cfg[field]!r} is not supported; accepted: {_COMMON[field]!r}")
        if class_name == "DPMSolverMultistepScheduler":
            if (cfg["algorithm_type"], int(cfg["solver_order"]), cfg["solver_type"]) != ("dpmsolver++", 2, "midpoint"):
                raise ValueError(f"DPMSolverMultistepScheduler with algorithm_type={cfg['algorithm_type']!r}, "
                                 f"solver_order={cfg['solver_order']!r}, solver_type={cfg['solver_type']!r}; "
                                 f"supported: 'dpmsolver++', 2, 'midpoint' (flaxdiff's dpmpp_2m)")
            if cfg["lambda_min_clipped"] != -math.inf:
                raise ValueError(f"scheduler lambda_min_clipped={cfg['lambda_min_clipped']!r}; supported: -inf")
        if class_name == "EulerDiscreteScheduler" and (cfg["interpolation_type"], cfg["timestep_type"]) != (
                "linear", "discrete"):
            raise ValueError(f"EulerDiscreteScheduler interpolation_type={cfg['interpolation_type']!r}, "
                             f"timestep_type={cfg['timestep_type']!r}; supported: 'linear', 'discrete'")
        if cfg["clip_sample"]:
            logger.warning("scheduler clip_sample=true: flaxdiff does not clip x0_hat (SD configs set it false)")
        if class_name not in SAMPLER_OF_CLASS:
            logger.info("diffusers %s has no exact flaxdiff counterpart: its schedule and prediction type are kept, "
                        "sampling uses %s on DPM-Solver's grid", class_name, DEFAULT_SAMPLER)
        return cls(class_name=class_name, num_train_timesteps=int(cfg["num_train_timesteps"]),
                   beta_schedule=str(cfg["beta_schedule"]), beta_start=float(cfg["beta_start"]),
                   beta_end=float(cfg["beta_end"]), prediction_type=str(cfg["prediction_type"]),
                   timestep_spacing=str(cfg["timestep_spacing"]), steps_offset=int(cfg["steps_offset"]),
                   rescale_betas_zero_snr=bool(cfg["rescale_betas_zero_snr"]),
                   final_sigmas_type=str(cfg["final_sigmas_type"]), use_karras_sigmas=bool(cfg["use_karras_sigmas"]),
                   set_alpha_to_one=bool(cfg["set_alpha_to_one"]), lower_order_final=bool(cfg["lower_order_final"]))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusersScheduler:
        """From a diffusers ``scheduler/`` directory or its ``scheduler_config.json`` file."""
        path = Path(path)
        file = path / SCHEDULER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no {SCHEDULER_FILE} at {path}")
        return cls.from_config(json.loads(file.read_text()))

    # -- the toolkit's objects -----------------------------------------------------------------------------------

    @property
    def schedule(self) -> DiscreteVPSchedule:
        """The training noise schedule (float64 tables; alpha_bar_k at t = (k + 1) / T)."""
        kind = _BETA_KINDS[self.beta_schedule]
        extra = {} if kind == "cosine" else {"beta_start": self.beta_start, "beta_end": self.beta_end}
        return DiscreteVPSchedule(kind, num_timesteps=self.num_train_timesteps,
                                  zero_terminal_snr=self.rescale_betas_zero_snr, **extra)

    @property
    def predictor(self) -> predictors_lib.Predictor:
        return predictors_lib.get(_PREDICTORS[self.prediction_type])

    @property
    def sampler(self) -> str:
        """The flaxdiff sampler reproducing this scheduler class (DEFAULT_SAMPLER for the others)."""
        return SAMPLER_OF_CLASS.get(self.class_name, DEFAULT_SAMPLER)

    def sampler_options(self, steps: int) -> dict[str, Any]:
        """Options of :attr:`sampler` that make it take exactly diffusers' steps (only those the sampler has):
        DPM-Solver++(2M) keeps second order on every step diffusers does (no step-size extrapolation guard) and
        lowers the order of its last step when diffusers' ``lower_order_final`` does (fewer than 15 steps)."""
        if self.class_name != "DPMSolverMultistepScheduler":
            return {}
        wanted = {"max_step_growth": math.inf, "max_step": math.inf,
                  "lower_order_final": self.lower_order_final and steps < 15}
        fields = {field.name for field in dataclasses.fields(type(samplers_lib.get(self.sampler)))}
        return {key: value for key, value in wanted.items() if key in fields}

    @property
    def grid_family(self) -> str:
        return _GRID_FAMILY.get(self.class_name, "dpm")

    def alphas_cumprod(self) -> np.ndarray:
        """diffusers' float32 alpha_bar table (betas and products in float32 as its schedulers compute them; equal
        to theirs within a few float32 ulps, torch's cumprod rounds differently)."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=np.float32) ** 2
        else:
            betas = self.schedule.betas().astype(np.float32)
        if self.rescale_betas_zero_snr and self.beta_schedule != "squaredcos_cap_v2":
            betas = _rescale_zero_snr_float32(betas)
        elif self.rescale_betas_zero_snr:
            betas = _rescale_zero_snr_float32(DiscreteVPSchedule("cosine", num_timesteps=T).betas().astype(
                np.float32))
        table = np.cumprod(1.0 - betas, dtype=np.float32)
        if self.rescale_betas_zero_snr and self.grid_family in ("euler", "dpm"):
            table[-1] = np.float32(2.0 ** -24)
        return table

    def sigma_table(self) -> np.ndarray:
        """s_k = sqrt((1 - alpha_bar_k) / alpha_bar_k), float32, increasing in k."""
        table = self.alphas_cumprod()
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - table) / table).astype(np.float32)

    # -- grids -----------------------------------------------------------------------------------------------------

    def _spaced_timesteps(self, steps: int, family: str) -> np.ndarray:
        T, spacing = self.num_train_timesteps, self.timestep_spacing
        if spacing == "trailing":
            return np.round(np.arange(T, 0, -T / steps)) - 1
        if family == "dpm":
            if spacing == "linspace":
                return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
            return (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + self.steps_offset
        if spacing == "linspace":
            values = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
            return values.round() if family == "ddim" else values
        return (np.arange(0, steps) * (T // steps)).round()[::-1] + self.steps_offset

    def grid(self, steps: int) -> DiffusersGrid:
        """The levels and timesteps diffusers' scheduler visits with ``steps`` inference steps."""
        if not isinstance(steps, int) or steps < 1 or steps > self.num_train_timesteps:
            raise ValueError(f"steps={steps!r} must be an integer in [1, {self.num_train_timesteps}]")
        family, table = self.grid_family, self.sigma_table()
        timesteps = np.asarray(self._spaced_timesteps(steps, family), np.float64)
        sigma_min = float(table[0])
        if family == "ddim":
            ratio = self.num_train_timesteps // steps
            if np.any(timesteps[:-1] - ratio != timesteps[1:]):
                raise ValueError(f"DDIM with timestep_spacing={self.timestep_spacing!r} and steps={steps} steps from k "
                                 f"to k - {ratio}, which is not the next timestep of {timesteps.astype(int).tolist()}; "
                                 f"use 'leading' or 'trailing'")
            levels = table[timesteps.astype(np.int64)].astype(np.float64)
            final = 0.0 if self.set_alpha_to_one else sigma_min
            if not math.isfinite(levels[0]):
                levels[0] = float(np.sqrt((1 - 2.0 ** -24) / 2.0 ** -24))
                logger.warning("DDIM from alpha_bar = 0 (zero terminal SNR) starts at alpha_bar = 2^-24 instead")
        else:
            if self.use_karras_sigmas:
                if family == "dpm":
                    levels = _karras(steps, float(table[0]), float(table[-1]))
                    timesteps = _sigma_to_timestep_np(levels, np.log(table.astype(np.float64))).round()
                else:
                    spaced = np.interp(timesteps, np.arange(table.shape[0]), table)
                    levels = _karras(steps, float(spaced[-1]), float(spaced[0]))
                    timesteps = _sigma_to_timestep_np(levels, np.log(table)).astype(np.float32).astype(np.float64)
            else:
                levels = np.interp(timesteps, np.arange(table.shape[0]), table)
            final = sigma_min if (self.final_sigmas_type == "sigma_min" and
                                  self.class_name != "EulerAncestralDiscreteScheduler") else 0.0
        if final > 0 and levels[-1] <= final:
            levels, timesteps = levels[:-1], timesteps[:-1]
        sigmas = np.concatenate([levels, [final]]).astype(np.float32).astype(np.float64)
        start = float(sigmas[0])
        if not (family == "euler" and self.timestep_spacing in ("linspace", "trailing")):
            start = math.sqrt(start ** 2 + 1.0)
        return DiffusersGrid(sigmas=timesteps_lib.validate(sigmas), timesteps=timesteps, start_scale=start,
                             native_output=family != "euler")

    def named_grid(self, name: str, steps: int, **options: Any) -> DiffusersGrid:
        """A flaxdiff grid (``flaxdiff.timesteps``, e.g. "karras", "logsnr_uniform") over this table's level range
        [s_0, s_{T-1}], ending at 0; timesteps by log-sigma interpolation."""
        table = self.sigma_table().astype(np.float64)
        table = table[np.isfinite(table)]
        sigmas = timesteps_lib.get(name, steps, sigma_min=float(table[0]), sigma_max=float(table[-1]), **options)
        sigmas = np.asarray(sigmas, np.float32).astype(np.float64)
        timesteps = _sigma_to_timestep_np(sigmas[sigmas > 0], np.log(table))
        return DiffusersGrid(sigmas=sigmas, timesteps=timesteps, start_scale=math.sqrt(float(sigmas[0]) ** 2 + 1.0),
                             native_output=True)


def _rescale_zero_snr_float32(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1 in float32 (as diffusers): shift / scale sqrt(alpha_bar) so its last entry is 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def make_denoiser(model_fn: ModelFn, scheduler: DiffusersScheduler, grid: DiffusersGrid, guided: bool = False,
                  guidance_interval: tuple[float, float] | None = None) -> Callable[[Array, Array, Any], Array]:
    """D(x~, s, aux) -> x0_hat in VE coordinates for a network in diffusers' convention, aux = (params, cond,
    null_cond, guidance scale) (traced, so params are never baked into the compiled program).

    x_t = alpha x~ with alpha = 1 / sqrt(1 + s^2); F = model_fn(params, x_t, k(s), cond) with k(s) the grid's
    timestep for grid levels and :func:`sigma_to_timestep` otherwise;  epsilon: x0 = x~ - s F;
    v: x0 = alpha (x_t - s F) (= alpha x_t - sigma F with sigma = s alpha);  sample: x0 = F.
    guided: one batched forward of [cond; null_cond] rows, x0 = x0_u + w(s) (x0_c - x0_u), w(s) = scale inside
    ``guidance_interval`` (in s) and 1 outside (``flaxdiff.guidance``). Guiding x0 is guiding F: x0 is affine in F.
    """
    guidance_lib.check_interval(guidance_interval)
    table = scheduler.sigma_table().astype(np.float64)
    log_table = jnp.asarray(np.log(table[np.isfinite(table)]), jnp.float32)
    grid_levels = jnp.asarray(grid.sigmas[:grid.timesteps.shape[0]], jnp.float32)
    grid_steps = jnp.asarray(grid.timesteps, jnp.float32)
    prediction = scheduler.prediction_type

    def x0_of(params: Any, x: Array, sigma: Array, cond: Any) -> Array:
        match = sigma[:, None] == grid_levels[None, :]
        timestep = jnp.where(jnp.any(match, axis=1), jnp.sum(jnp.where(match, grid_steps[None, :], 0.0), axis=1),
                             sigma_to_timestep(sigma, log_table))
        s = sigma.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        alpha = jax.lax.rsqrt(1.0 + s * s)
        x_t = alpha * x
        output = model_fn(params, x_t, timestep, cond).astype(x.dtype)
        if prediction == "epsilon":
            return x - s * output
        if prediction == "v_prediction":
            return alpha * (x_t - s * output)
        return output

    def denoise(x: Array, sigma: Array, aux: Any) -> Array:
        params, cond, null_cond, scale = aux
        batch = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
        if not guided:
            return x0_of(params, x, sigma, cond)
        return guidance_lib.guided_x0(functools.partial(x0_of, params), x, sigma, cond, null_cond, scale,
                                      guidance_interval)

    return denoise


def sample(model_fn: ModelFn, scheduler: DiffusersScheduler, noise: Array, steps: int, cond: Any,
           params: Any = None, sampler: str | samplers_lib.Sampler | None = None,
           grid: str | DiffusersGrid | None = None, key: Array | None = None, sample_keys: Array | None = None,
           guidance_scale: float | None = None, null_cond: Any = None,
           guidance_interval: tuple[float, float] | None = None, grid_options: Mapping[str, Any] | None = None,
           denoiser: Callable[[Array, Array, Any], Array] | None = None, **sampler_options: Any) -> Array:
    """Run the diffusers sampling loop with a flaxdiff sampler; returns the latents diffusers would return.

    model_fn(params, x_t, timesteps, cond) -> F; noise: unit Gaussian x_T; sampler: a registered sampler (default
    ``scheduler.sampler``); grid: None (the scheduler's own levels), a flaxdiff grid name, or a
    :class:`DiffusersGrid`. Classifier-free guidance with ``null_cond`` (e.g. the negative-prompt embeddings),
    optionally only for s in ``guidance_interval``. ``denoiser``: a cached :func:`make_denoiser` result for this
    grid (the compiled program is reused when the same object is passed again).
    """
    if grid is None:
        grid = scheduler.grid(steps)
    elif isinstance(grid, str):
        grid = scheduler.named_grid(grid, steps, **dict(grid_options or {}))
    guided = guidance_scale is not None
    if guided and null_cond is None:
        raise ValueError("guidance_scale needs null_cond (the unconditional / negative-prompt conditioning)")
    if denoiser is None:
        denoiser = make_denoiser(model_fn, scheduler, grid, guided, guidance_interval)
    if sampler is None:
        sampler_options = {**scheduler.sampler_options(steps), **sampler_options}
    noise = jnp.asarray(noise, jnp.float32)
    scaled = noise * jnp.float32(grid.start_scale / grid.sigmas[0])
    aux = (params, {} if cond is None else cond, null_cond, None if not guided else jnp.float32(guidance_scale))
    x, _ = samplers_lib.sample(denoiser, scaled, sampler=scheduler.sampler if sampler is None else sampler,
                               grid=grid.sigmas, cond=aux, key=key, sample_keys=sample_keys, **sampler_options)
    last = float(grid.sigmas[-1])
    if last > 0 and grid.native_output:
        x = x * jnp.float32(1.0 / math.sqrt(1.0 + last * last))
    return x
