"""Samplers: one readable step function per algorithm, one compiled driver, a registry.

    get(name, **options) -> Sampler,    available() -> names
    sample(denoise, noise, sampler="dpmpp_2m", steps=..., grid=...) -> (samples, nfe)      plain D(x, sigma)
    sample_model(apply_fn, params, schedule, predictor, ...) -> (samples, nfe)             models, CFG, img2img

Families: ``ancestral`` (ddpm, ddim, euler_ancestral), ``ode`` (euler, heun, rk4, dpm_2), ``dpm_solver``
(dpmpp_2s_ancestral, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde), ``unipc``, ``adams`` (ipndm, lms: Adams-Bashforth in s)
and ``adaptive`` (dpm_adaptive). Adding a sampler is one class (its step, ``order``, ``deterministic_options``) and
one ``register`` line; tests/test_samplers.py measures its order from these declarations.
"""
from __future__ import annotations

from typing import Any

from flaxdiff.registry import Registry
from flaxdiff.samplers.adams import IPNDM, LMS
from flaxdiff.samplers.adaptive import DPMAdaptive
from flaxdiff.samplers.ancestral import DDIM, DDPM, EulerAncestral
from flaxdiff.samplers.common import Multistep, Sampler
from flaxdiff.samplers.dpm_solver import DPMPP2M, DPMPP2MSDE, DPMPP3MSDE, DPMPP2SAncestral
from flaxdiff.samplers.driver import DEFAULT_GRID, DEFAULT_SAMPLER, run, sample, sample_model
from flaxdiff.samplers.ode import DPM2, RK4, Euler, Heun
from flaxdiff.samplers.unipc import UniPC

__all__ = ["Sampler", "Multistep", "get", "available", "from_config", "register", "run", "sample", "sample_model",
           "DEFAULT_GRID", "DEFAULT_SAMPLER"]

_REGISTRY: Registry[Sampler] = Registry("sampler")
register = _REGISTRY.register
available = _REGISTRY.available
from_config = _REGISTRY.from_config


def get(name: str, **options: Any) -> Sampler:
    """Build sampler ``name`` with its options (e.g. ``get("ddim", eta=0.5)``); unknown names list the valid ones."""
    return _REGISTRY.get(name, **options)


for _cls in (DDPM, DDIM, EulerAncestral, Euler, Heun, RK4, DPM2, DPMPP2SAncestral, DPMPP2M, DPMPP2MSDE,
             DPMPP3MSDE, UniPC, DPMAdaptive, IPNDM, LMS):
    register(_cls.name, _cls)
