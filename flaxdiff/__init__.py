"""flaxdiff: diffusion and flow models for JAX and Flax Linen.

The algebra and the samplers are imported eagerly; the heavier subpackages (models, training, data, metrics,
interop, pipeline, objectives, config, checkpoints) load on first attribute access, so ``import flaxdiff`` stays light.
"""
import importlib
from typing import Any

from flaxdiff import denoiser, guidance, losses, predictors, samplers, schedules, timesteps

__version__ = "0.1.0"

_LAZY = ("models", "training", "data", "metrics", "interop", "pipeline", "objectives", "config", "checkpoints")

__all__ = ["denoiser", "guidance", "losses", "predictors", "samplers", "schedules", "timesteps", *_LAZY,
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"flaxdiff.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'flaxdiff' has no attribute {name!r}")
