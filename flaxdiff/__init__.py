"""flaxdiff: diffusion and flow models for JAX and Flax Linen."""
from flaxdiff import losses, predictors, schedules

__version__ = "0.1.0"

__all__ = ["losses", "predictors", "schedules", "__version__"]
