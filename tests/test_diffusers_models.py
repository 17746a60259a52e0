"""diffusers U-Nets (SD 1.x, SD 2.x, SDXL) and DiT in Flax: parity with torch on tiny random models, export round
trips, full-size layouts by key/shape equality (torch on the meta device, flax by eval_shape), and load errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel as TorchDiT
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file

from flaxdiff.interop import diffusers_dit as dd
from flaxdiff.interop import diffusers_unet as du
from flaxdiff.interop import safetensors_io, torch_weights

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
FAMILIES = {
    "sd1": TINY_UNET,
    "sd2": {**TINY_UNET, "use_linear_projection": True, "attention_head_dim": (2, 4)},
    "sdxl": {**TINY_UNET, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
             "projection_class_embeddings_input_dim": 8 + 6 * 4, "use_linear_projection": True,
             "attention_head_dim": (2, 4)},
}
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)

# Published configs (their computation-relevant fields) of the full-size models.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def _perturbed(model):
    """diffusers zero-initialises some output layers; random weights everywhere make the parity test meaningful."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def unet_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    return request.param, _save(_perturbed(TorchUNet(**FAMILIES[request.param])),
                                tmp_path_factory.mktemp(request.param))


def _unet_inputs(family):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 8, 8).astype(np.float32)
    text = rng.randn(2, 5, 8).astype(np.float32)
    timesteps = np.array([10.0, 637.0], np.float32)
    cond, extra = {"text": text}, {}
    if family == "sdxl":
        pooled = rng.randn(2, 8).astype(np.float32)
        time_ids = np.array([[8, 8, 0, 0, 8, 8], [16, 12, 1, 2, 8, 8]], np.float32)
        cond.update(pooled=pooled, time_ids=time_ids)
        extra = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}}
    return x, timesteps, cond, extra


def test_unet_matches_torch_and_exports_back(unet_dir, tmp_path):
    family, path = unet_dir
    module, params, config = du.load_diffusers_unet(path)
    x, timesteps, cond, extra = _unet_inputs(family)
    reference = TorchUNet.from_pretrained(path).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x), torch.from_numpy(timesteps), torch.from_numpy(cond["text"]),
                             **extra).sample.numpy()
    out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), timesteps, cond)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1

    if family == "sd1":  # the toolkit's call convention: c_noise = 1000 t with t = (k + 1) / T is timestep k
        apply_fn = du.c_noise_apply_fn(module, num_train_timesteps=1000)
        by_c_noise = apply_fn(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps + 1.0), cond)
        np.testing.assert_allclose(np.asarray(by_c_noise), np.asarray(out), atol=1e-5, rtol=0)
    if family == "sdxl":
        with pytest.raises(ValueError, match=r"needs cond\['pooled'\] and cond\['time_ids'\]"):
            module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), timesteps, {"text": cond["text"]})

    # export back: diffusers loads it, and every tensor is bitwise the original
    du.save_diffusers_unet(tmp_path / "export", params, config)
    original, exported = load_file(str(path / du.WEIGHTS_FILE)), load_file(str(tmp_path / "export" / du.WEIGHTS_FILE))
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded = TorchUNet.from_pretrained(tmp_path / "export")
    assert du.unet_config_from_diffusers(dict(reloaded.config)) == config


def test_dit_matches_torch_and_exports_back(tmp_path):
    torch.manual_seed(0)
    path = _save(_perturbed(TorchDiT(**TINY_DIT)), tmp_path / "dit")
    module, params, config = dd.load_diffusers_dit(path)
    assert config.learned_sigma and config.num_classes == 10
    rng = np.random.RandomState(1)
    x = rng.randn(2, 4, 8, 8).astype(np.float32)
    timesteps = np.array([3.0, 901.0], np.float32)
    labels = np.array([7, 10])  # 10 = the null class
    with torch.no_grad():
        expected = TorchDiT.from_pretrained(path)(torch.from_numpy(x), torch.from_numpy(timesteps),
                                                  torch.from_numpy(labels)).sample.numpy()
    out = module.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), timesteps, {"label": labels})
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, atol=1e-4, rtol=0)
    eps = dd.c_noise_apply_fn(module)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps + 1.0),
                                      {"label": labels})
    np.testing.assert_allclose(np.asarray(eps), np.asarray(out)[..., :4], atol=1e-5, rtol=0)

    dd.save_diffusers_dit(tmp_path / "export", params, config)
    exported = load_file(str(tmp_path / "export" / du.WEIGHTS_FILE))
    for key, value in load_file(str(path / du.WEIGHTS_FILE)).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert dd.dit_config_from_diffusers(dict(TorchDiT.from_pretrained(tmp_path / "export").config)) == config


def _meta_state_shapes(cls, kwargs):
    with torch.device("meta"):
        model = cls(**kwargs)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _flax_torch_shapes(key_map):
    return {key: torch_weights.torch_shape(shape, layout) for key, (_, layout, shape) in key_map.items()}


@pytest.mark.parametrize("name,kwargs", [("sd15", SD15_UNET), ("sd21", SD21_UNET), ("sdxl", SDXL_UNET)])
def test_full_size_unet_layout(name, kwargs):
    expected = _meta_state_shapes(TorchUNet, kwargs)
    config = du.unet_config_from_diffusers({"_class_name": "UNet2DConditionModel", **kwargs})
    assert _flax_torch_shapes(du.unet_key_map(config)) == expected
    counts = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
    assert sum(int(np.prod(shape)) for shape in expected.values()) == counts[name]


def test_full_size_dit_layout():
    expected = _meta_state_shapes(TorchDiT, DIT_XL_2)
    config = dd.dit_config_from_diffusers({"_class_name": "DiTTransformer2DModel", **DIT_XL_2})
    assert _flax_torch_shapes(dd.dit_key_map(config)) == expected


def test_key_map_is_a_bijection_with_explicit_names():
    config = du.unet_config_from_diffusers(dict(FAMILIES["sdxl"]))
    key_map = du.unet_key_map(config)
    assert len({path for path, _, _ in key_map.values()}) == len(key_map)
    assert du.flax_path_to_torch_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    assert du.flax_path_to_torch_key(("up_blocks_0", "attentions_1", "transformer_blocks_1", "ff", "net_0", "proj",
                                      "bias")) == "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.0.proj.bias"
    assert "add_embedding.linear_2.weight" in key_map


def test_sharded_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    model = TorchUNet(**TINY_UNET)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / du.WEIGHTS_FILE).exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _, single, _ = du.load_diffusers_unet(tmp_path / "single")
    _, sharded, _ = du.load_diffusers_unet(tmp_path / "sharded")
    flat_single, flat_sharded = safetensors_io.flatten_tree(single), safetensors_io.flatten_tree(sharded)
    assert sorted(flat_single) == sorted(flat_sharded)
    for key, value in flat_single.items():
        np.testing.assert_array_equal(flat_sharded[key], value)


def test_load_errors_name_the_first_bad_key(tmp_path):
    torch.manual_seed(0)
    path = _save(TorchUNet(**TINY_UNET), tmp_path / "unet")
    state = load_file(str(path / du.WEIGHTS_FILE))
    config = du.unet_config_from_diffusers(json.loads((path / du.CONFIG_FILE).read_text()))

    missing = dict(state)
    del missing["conv_in.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys, first conv_in\.bias \(expected shape \(8,\)\)"):
        du.from_torch_state_dict(missing, config)

    extra = {**state, "extra.weight": np.zeros((3, 2), np.float32)}
    with pytest.raises(ValueError, match=r"1 unexpected keys, first extra\.weight \(shape \(3, 2\)\)"):
        du.from_torch_state_dict(extra, config)

    wrong = {**state, "conv_out.weight": np.zeros((4, 8, 1, 1), np.float32)}
    save_file(wrong, str(path / du.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"conv_out\.weight has shape \(4, 8, 1, 1\), expected \(4, 8, 3, 3\)"):
        du.load_diffusers_unet(path)

    with pytest.raises(ValueError, match=r"class_embed_type='timestep'; flaxdiff supports only None"):
        du.unet_config_from_diffusers({**TINY_UNET, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match=r"down block 'AttnDownBlock2D'"):
        du.unet_config_from_diffusers({**TINY_UNET, "down_block_types": ("AttnDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.safetensors in"):
        (path / du.WEIGHTS_FILE).unlink()
        du.load_diffusers_unet(path)
    with pytest.raises(ValueError, match=r"norm_type='ada_norm'"):
        dd.dit_config_from_diffusers({**TINY_DIT, "norm_type": "ada_norm"})
