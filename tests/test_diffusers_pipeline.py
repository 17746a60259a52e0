"""Whole diffusers pipelines in JAX: tiny random StableDiffusionPipeline, StableDiffusionXLPipeline and DiTPipeline
directories built in torch, loaded by flaxdiff, and sampled to the same images as diffusers from the same latents."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import text_models as tm  # noqa: E402

from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline  # noqa: E402

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                norm_num_groups=4, layers_per_block=1, sample_size=16)
STEPS = 6


def _randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _tokenizer(directory, vocab):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                         model_max_length=tm.CLIP_TINY["max_position_embeddings"], pad_token="<|endoftext|>")


def _text_parts(root, projection):
    words = root / "words"
    vocab = tm.write_clip_tokenizer(words)
    model = tm.write_clip_model(root / "clip_ref", vocab, projection=projection, hidden_act="gelu")
    return model, _tokenizer(words, vocab)


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config.update(overrides)
    return _randomise(UNet2DConditionModel(**config), 1)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return _randomise(AutoencoderKL(**TINY_VAE), 2)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    text_encoder, tokenizer = _text_parts(root, projection=False)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unet(),
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def sd_pipe(sd_dir):
    return DiffusersPipeline.from_pretrained(sd_dir)


def _latents(count, shape=(4, 8, 8), seed=0):
    return np.random.RandomState(seed).randn(count, *shape).astype(np.float32)


def test_stable_diffusion_matches_diffusers(sd_dir, sd_pipe):
    from diffusers import StableDiffusionPipeline

    prompts, negative = ["a photo of a cat", "the number 3"], ["a handwritten digit zero", "blurry"]
    latents = _latents(2)
    reference = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        expected = reference(prompts, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
                             latents=torch.from_numpy(latents), output_type="np").images
    images = sd_pipe.generate(prompts, negative_prompts=negative, steps=STEPS, guidance_scale=7.5,
                              latents=latents.transpose(0, 2, 3, 1))
    assert images.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(images, expected, atol=1e-3, rtol=0)
    assert expected.std() > 0.01



def test_seeds_are_per_image_and_bfloat16_is_close(sd_dir, sd_pipe):
    options = dict(steps=STEPS, sampler="euler_ancestral", grid="karras")
    both = sd_pipe.generate(["a photo of a cat", "a photo of a dog"], seeds=[5, 9], **options)
    swapped = sd_pipe.generate(["a photo of a dog", "a photo of a cat"], seeds=[9, 5], **options)
    np.testing.assert_allclose(swapped[::-1], both, atol=1e-5)
    assert np.abs(both[0] - both[1]).max() > 1e-2
    half = DiffusersPipeline.from_pretrained(sd_dir, dtype="bfloat16")
    low = half.generate(["a photo of a cat", "a photo of a dog"], seeds=[5, 9], **options)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, both, atol=0.1)
    assert np.abs(low - both).max() > 0  # it did compute in bfloat16


def test_sdxl_matches_diffusers(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    encoder_1, tokenizer = _text_parts(tmp_path / "one", projection=False)
    encoder_2, tokenizer_2 = _text_parts(tmp_path / "two", projection=True)
    pooled = encoder_2.config.projection_dim
    unet = _unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=pooled + 6 * 8, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                          if k not in ("clip_sample", "set_alpha_to_one")})
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=encoder_1, text_encoder_2=encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    latents = _latents(1, seed=4)
    with torch.no_grad():
        expected = pipe(["a photo of a cat"], num_inference_steps=STEPS, guidance_scale=5.0, height=16, width=16,
                        latents=torch.from_numpy(latents), output_type="np").images
    ours = DiffusersPipeline.from_pretrained(tmp_path / "pipe")
    assert ours.kind == "sdxl" and ours.force_zeros_for_empty_prompt and ours.scheduler.sampler == "euler"
    images = ours.generate(["a photo of a cat"], steps=STEPS, guidance_scale=5.0, height=16, width=16,
                           latents=latents.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(images, expected, atol=1e-3, rtol=0)


def test_dit_matches_diffusers(tmp_path, monkeypatch):
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler
    from diffusers.pipelines.dit import pipeline_dit

    torch.manual_seed(0)
    transformer = _randomise(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                   num_embeds_ada_norm=1000), 3)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(),
                       scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
                       id2label={i: f"class {i}" for i in range(1000)})
    pipe.save_pretrained(tmp_path / "pipe")
    index_file = tmp_path / "pipe" / "model_index.json"  # the hub's DiT model_index.json carries id2label
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()),
                                      "id2label": {str(i): f"class {i}" for i in range(1000)}}))
    latents = _latents(2, seed=5)
    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda shape, **kwargs: torch.from_numpy(latents))
    with torch.no_grad():
        expected = pipe([3, 7], guidance_scale=4.0, num_inference_steps=STEPS, output_type="np").images
    ours = DiffusersPipeline.from_pretrained(tmp_path / "pipe")
    images = ours.generate(labels=[3, "class 7"], steps=STEPS, guidance_scale=4.0,
                           latents=latents.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(images, expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match=r"label 1200 outside \[0, 1000\)"):
        ours.generate(labels=[1200])


def test_sample_grid_for_the_cli(sd_pipe, tmp_path):
    from PIL import Image

    from flaxdiff.interop.diffusers_pipeline import sample_grid

    options = dict(steps=STEPS, sampler="euler_ancestral", grid="karras")
    prompts = ["a photo of a cat", "a photo of a dog"]
    result = sample_grid(sd_pipe, tmp_path / "grid.png", prompts=prompts, seed=3, **options)
    assert result["pixels"] == [32, 16] and result["rows"] == 2 and result["guidance_scale"] == 7.5
    expected = sd_pipe.generate(prompts, seed=3, **options)
    pixels = np.asarray(Image.open(tmp_path / "grid.png"), np.float32) / 255.0
    np.testing.assert_allclose(pixels, np.concatenate(list(expected), axis=0), atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="give prompts"):
        sample_grid(sd_pipe, tmp_path / "none.png")


def test_pipeline_from_diffusers(sd_dir):
    from flaxdiff.pipeline import Pipeline

    pipe = Pipeline.from_diffusers(sd_dir)
    assert isinstance(pipe, DiffusersPipeline) and pipe.kind == "sd" and pipe.scheduler.sampler == "ddim"
    assert pipe.latent_shape() == (8, 8, 4) and pipe.latent_shape(32, 16) == (16, 8, 4)


def test_fine_tuning_loss_is_diffusers_training_loss(sd_dir, sd_pipe):
    import jax
    import jax.numpy as jnp
    from diffusers import StableDiffusionPipeline

    from flaxdiff import losses

    parts = sd_pipe.training_parts()
    x0 = np.random.RandomState(6).randn(2, 8, 8, 4).astype(np.float32)
    eps = np.random.RandomState(7).randn(2, 8, 8, 4).astype(np.float32)
    cond = sd_pipe.encode_prompts(["a photo of a cat", "the number 3"], 16, 16)

    def loss_fn(params):
        return losses.diffusion_loss(parts["apply_fn"], params, jnp.asarray(x0), cond, jax.random.key(0),
                                     parts["schedule"], parts["predictor"], losses.UniformWeighting(),
                                     parts["time_sampler"], noise=jnp.asarray(eps))

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(parts["params"])
    reference = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    k = np.round(np.asarray(metrics["t"]) * 1000).astype(np.int64) - 1
    alpha_bar = reference.scheduler.alphas_cumprod.numpy()[k].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * eps
    with torch.no_grad():
        out = reference.unet(torch.from_numpy(x_t.transpose(0, 3, 1, 2)), torch.from_numpy(k),
                             torch.from_numpy(np.asarray(cond["text"]))).sample.numpy().transpose(0, 2, 3, 1)
    assert float(loss) == pytest.approx(float(np.mean((out - eps) ** 2)), rel=1e-4)
    stepped = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, parts["params"], grads)
    assert float(jax.jit(loss_fn)(stepped)[0]) < float(loss)
    assert parts["null_cond"]["text"].shape == (1,) + cond["text"].shape[1:]


SHARDED = """
import json, sys
import jax, numpy as np
from flaxdiff.interop.diffusers_pipeline import DiffusersPipeline
pipe = DiffusersPipeline.from_pretrained(sys.argv[1])
out = pipe.generate(["a photo of a cat", "the number 3", "digit seven"], seeds=[1, 2, 3], steps=3,
                    guidance_scale=3.0, sampler="euler_ancestral", output="latents")
np.save(sys.argv[2], out)
print(json.dumps({"devices": jax.device_count(), "mesh": pipe.mesh.size}))
"""


def test_rows_are_split_over_a_mesh(sd_dir, sd_pipe, tmp_path):
    """Two forced host devices: 3 rows padded to 4 and split over the mesh give the single-device latents."""
    import subprocess

    expected = sd_pipe.generate(["a photo of a cat", "the number 3", "digit seven"], seeds=[1, 2, 3], steps=3,
                                guidance_scale=3.0, sampler="euler_ancestral", output="latents")
    from conftest import host_devices_env

    env = host_devices_env(2)
    result = subprocess.run([sys.executable, "-c", SHARDED, str(sd_dir), str(tmp_path / "out.npy")], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"devices": 2, "mesh": 2}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4, rtol=0)


def test_pipeline_errors(sd_pipe, tmp_path):
    with pytest.raises(ValueError, match="takes prompts"):
        sd_pipe.generate(labels=[1])
    with pytest.raises(ValueError, match=r"negative_prompts must be a list of 1 or 2 strings"):
        sd_pipe.generate(["a", "b"], negative_prompts=["x", "y", "z"])
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\); expected \(1, 8, 8, 4\)"):
        sd_pipe.generate(["a"], latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no model_index.json in"):
        DiffusersPipeline.from_pretrained(tmp_path)


def test_cli_sample_diffusers(sd_dir, sd_pipe, tmp_path, capsys):
    import json

    from PIL import Image

    from flaxdiff import cli

    out = tmp_path / "cli.png"
    code = cli.main(["sample", "--diffusers", str(sd_dir), "--out", str(out), "--prompts", "a photo of a cat",
                     "--steps", str(STEPS), "--sampler", "euler", "--guidance", "5", "--seed", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["rows"] == 1 and report["guidance_scale"] == 5.0 and report["sampler"] == "euler"
    expected = sd_pipe.generate(["a photo of a cat"], seed=1, steps=STEPS, sampler="euler", guidance_scale=5.0)
    pixels = np.asarray(Image.open(out), np.float32) / 255.0
    np.testing.assert_allclose(pixels, expected[0], atol=1 / 255 + 1e-6)
    # a diffusers directory given as the positional path is recognised by its model_index.json
    assert cli.main(["sample", str(sd_dir), "--out", str(tmp_path / "b.png"), "--prompts", "x", "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "--diffusers", str(tmp_path), "--out", str(tmp_path / "c.png"), "--prompts", "x"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
