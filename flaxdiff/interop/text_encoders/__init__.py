"""Pretrained text encoders in Flax Linen, exact to the torch reference, loaded from local files.

- :func:`load_text_encoder` (a transformers / diffusers / OpenCLIP directory) -> :class:`PretrainedTextEncoder`
  with ``encode(prompts) -> {"text", "text_mask", "pooled"}`` (see :mod:`.encoder`);
- :mod:`.clip`: transformers' CLIP text transformer (``CLIPTextModel``, ``CLIPTextModelWithProjection``);
- :mod:`.openclip`: the OpenCLIP text tower in its own weight layout;
- :mod:`.t5`: transformers' ``T5EncoderModel`` (T5 v1.1 / Flan-T5 gated GELU, original T5 ReLU);
- :mod:`.tokenizers`: CLIP / OpenCLIP BPE (``tokenizers``) and T5 (``sentencepiece``) tokenizers from the model dir;
- :mod:`.weights`: code-free reading of safetensors / ``torch.load(weights_only=True)`` and the key-map machinery.
"""
from flaxdiff.interop.text_encoders import clip, openclip, t5, tokenizers, weights
from flaxdiff.interop.text_encoders.encoder import (EncodeOptions, PretrainedTextEncoder, detect_kind,
                                                    is_text_encoder_dir, load_text_encoder)

__all__ = ["EncodeOptions", "PretrainedTextEncoder", "clip", "detect_kind", "is_text_encoder_dir",
           "load_text_encoder", "openclip", "t5", "tokenizers", "weights"]
