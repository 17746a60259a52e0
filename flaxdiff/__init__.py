"""flaxdiff: diffusion and flow models for JAX and Flax Linen."""
from flaxdiff import denoiser, losses, predictors, schedules

__version__ = "0.1.0"

__all__ = ["denoiser", "losses", "predictors", "schedules", "__version__"]
