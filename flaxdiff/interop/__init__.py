"""Weights in and out of flaxdiff: diffusers ``AutoencoderKL`` (Stable Diffusion / SDXL / Flux VAEs) and
safetensors export/import of any flaxdiff model with its JSON config.

- :func:`load_autoencoder` (a diffusers VAE dir, a flaxdiff export dir or a training checkpoint dir)
  -> ``(module, params, config)``;
- :mod:`~flaxdiff.interop.diffusers_vae`: the explicit torch <-> flax key and layout map, loading and saving;
- :mod:`~flaxdiff.interop.torch_weights`: the torch <-> flax array layouts (conv, dense, vector) and the key-map
  conversion every port (VAE, U-Net, DiT, text encoders) shares;
- :func:`load_text_encoder` (a transformers CLIP / T5, diffusers ``text_encoder*/`` or OpenCLIP dir) -> a frozen
  encoder with ``encode(prompts) -> {"text", "text_mask", "pooled"}``; see :mod:`~flaxdiff.interop.text_encoders`;
- :mod:`~flaxdiff.interop.safetensors_io`: :func:`export_params`, :func:`import_params`, :func:`load_model`,
  :func:`export_checkpoint`;
- diffusers denoisers and pipelines: :func:`load_diffusers_unet` (SD 1.x / 2.x / SDXL ``UNet2DConditionModel``),
  :func:`load_diffusers_dit` (``DiTTransformer2DModel``), :class:`DiffusersScheduler` (a ``scheduler_config.json``
  as schedule + predictor + sampler + grid) and :class:`DiffusersPipeline` (a whole pipeline dir); see
  docs/diffusers.md.
"""
from flaxdiff.interop import diffusers_vae, safetensors_io
from flaxdiff.interop.diffusers_vae import load_autoencoder, load_diffusers_autoencoder, save_diffusers_autoencoder
from flaxdiff.interop.safetensors_io import export_checkpoint, export_params, import_params, load_model
from flaxdiff.interop import diffusers_dit, diffusers_pipeline, diffusers_scheduler, diffusers_unet
from flaxdiff.interop.diffusers_dit import load_diffusers_dit, save_diffusers_dit
from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline, load_diffusers_pipeline
from flaxdiff.interop.diffusers_scheduler import DiffusersScheduler
from flaxdiff.interop.diffusers_unet import load_diffusers_unet, save_diffusers_unet

__all__ = [
    "diffusers_vae", "export_checkpoint", "export_params", "import_params", "load_autoencoder",
    "load_diffusers_autoencoder", "load_model", "load_text_encoder", "safetensors_io", "save_diffusers_autoencoder",
    "text_encoders", "diffusers_dit", "diffusers_pipeline", "diffusers_scheduler", "diffusers_unet",
    "DiffusersPipeline", "DiffusersScheduler", "load_diffusers_dit", "load_diffusers_pipeline", "load_diffusers_unet",
    "save_diffusers_dit", "save_diffusers_unet",
]


def __getattr__(name: str):
    """``text_encoders`` and ``load_text_encoder`` are imported on first use (they pull in flaxdiff.data)."""
    if name in ("text_encoders", "load_text_encoder"):
        import importlib

        text_encoders = importlib.import_module("flaxdiff.interop.text_encoders")
        return text_encoders if name == "text_encoders" else text_encoders.load_text_encoder
    raise AttributeError(f"module 'flaxdiff.interop' has no attribute {name!r}")
