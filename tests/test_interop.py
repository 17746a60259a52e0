"""Interop: diffusers AutoencoderKL weights against torch, the key/layout map, safetensors export/import."""
import inspect
import json
import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

from flaxdiff import models
from flaxdiff.interop import diffusers_vae, safetensors_io, torch_weights
from flaxdiff.models.autoencoder import scale_latents
from flaxdiff.training.checkpoint import CheckpointManager

TOL = 1e-4


def _torch_vae(seed: int, **config) -> TorchAutoencoderKL:
    """A randomly initialised diffusers VAE with every parameter perturbed (so norm scales/biases matter)."""
    torch.manual_seed(seed)
    levels = len(config["block_out_channels"])
    vae = TorchAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels, **config)
    with torch.no_grad():
        for param in vae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return vae.eval()


def _torch_outputs(vae: TorchAutoencoderKL, images: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    with torch.no_grad():
        posterior = vae.encode(nchw(images)).latent_dist
        return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(vae.decode(nchw(z)).sample)


def _flax_outputs(model, params, images: np.ndarray, z: np.ndarray) -> tuple[jax.Array, ...]:
    """(mean, logvar, decode(z)) of the flaxdiff autoencoder, in one compiled call."""
    def run(params, images, z):
        mean, logvar = model.apply({"params": params}, images, method=model.encode)
        return mean, logvar, model.apply({"params": params}, z, method=model.decode)
    return jax.jit(run)(params, images, z)


def _assert_trees_bitwise_equal(a, b) -> None:
    flat_a, flat_b = safetensors_io.flatten_tree(a), safetensors_io.flatten_tree(b)
    assert sorted(flat_a) == sorted(flat_b)
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


SD_CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 sample_size=16)


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    """(torch model, save_pretrained dir, flaxdiff (module, params, config)) of a tiny SD-style VAE."""
    vae = _torch_vae(0, **SD_CONFIG)
    directory = tmp_path_factory.mktemp("sd_vae")
    vae.save_pretrained(directory)
    return vae, directory, diffusers_vae.load_diffusers_autoencoder(directory)


def test_sd_vae_encode_decode_match_torch(sd_vae):
    vae, _, (model, params, config) = sd_vae
    rng = np.random.RandomState(0)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    mean, logvar, decoded = _torch_outputs(vae, images, z)
    flax_mean, flax_logvar, flax_decoded = _flax_outputs(model, params, images, z)
    assert np.abs(mean).max() > 0.1 and np.abs(decoded).max() > 0.1
    np.testing.assert_allclose(flax_mean, mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(flax_logvar, logvar, atol=TOL, rtol=0)
    np.testing.assert_allclose(flax_decoded, decoded, atol=TOL, rtol=0)
    assert config.scaling_factor == pytest.approx(0.18215) and config.shift_factor is None
    assert models.count_params(params) == sum(p.numel() for p in vae.parameters())


def test_flux_style_vae_without_quant_convs_and_with_shift_matches_torch(tmp_path):
    vae = _torch_vae(1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=6, norm_num_groups=4,
                     scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    vae.save_pretrained(tmp_path)
    model, params, config = diffusers_vae.load_diffusers_autoencoder(tmp_path)
    assert (config.scaling_factor, config.shift_factor, config.latent_channels) == (1.5305, 0.0609, 6)
    np.testing.assert_array_equal(params["quant_conv"]["kernel"][0, 0], np.eye(12, dtype=np.float32))
    rng = np.random.RandomState(1)
    images = rng.uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    z = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
    mean, _, decoded = _torch_outputs(vae, images, z)
    flax_mean, _, flax_decoded = _flax_outputs(model, params, images, z)
    np.testing.assert_allclose(flax_mean, mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(flax_decoded, decoded, atol=TOL, rtol=0)
    # diffusers' Flux/SD3 pipelines feed (z - shift_factor) * scaling_factor to the transformer.
    np.testing.assert_allclose(scale_latents(config, flax_mean), (mean - 0.0609) * 1.5305, atol=TOL, rtol=0)


def test_sdxl_style_config_loads_bitwise(tmp_path):
    vae = _torch_vae(2, block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
                     sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    vae.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["force_upcast"] is True and config_json["scaling_factor"] == 0.13025
    model, params, config = diffusers_vae.load_diffusers_autoencoder(tmp_path / "config.json",
                                                                     tmp_path / diffusers_vae.WEIGHTS_FILE)
    assert config == models.AutoencoderConfig(block_out_channels=(8, 16, 16), layers_per_block=2,
                                              latent_channels=4, norm_num_groups=4, scaling_factor=0.13025)
    assert config.downsample_factor == 4 and isinstance(model, models.AutoencoderKL)
    torch_state = {k: v.numpy() for k, v in vae.state_dict().items()}
    back = diffusers_vae.to_diffusers_state_dict(params, config)
    assert sorted(back) == sorted(torch_state)
    for key, value in torch_state.items():
        assert back[key].shape == value.shape and back[key].tobytes() == value.tobytes(), key


def test_key_map_is_explicit_and_covers_torch_state_dict(sd_vae):
    vae, _, (_, _, config) = sd_vae
    key_map = diffusers_vae.diffusers_key_map(config)
    assert sorted(key_map) == sorted(vae.state_dict())
    assert key_map["encoder.conv_in.weight"] == (("encoder", "conv_in", "kernel"), "conv", (3, 3, 3, 8))
    assert key_map["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (
        ("encoder", "down_blocks_1", "resnets_0", "conv_shortcut", "kernel"), "conv", (1, 1, 8, 16))
    assert key_map["encoder.down_blocks.0.downsamplers.0.conv.weight"][0][2:4] == ("downsamplers_0", "conv")
    assert key_map["decoder.mid_block.attentions.0.to_out.0.weight"] == (
        ("decoder", "mid_block", "attentions_0", "to_out_0", "kernel"), "dense", (16, 16))
    assert key_map["decoder.up_blocks.0.upsamplers.0.conv.bias"][1] == "vector"
    assert key_map["encoder.conv_norm_out.weight"] == (("encoder", "conv_norm_out", "scale"), "vector", (16,))
    assert key_map["post_quant_conv.weight"] == (("post_quant_conv", "kernel"), "conv", (1, 1, 4, 4))


def test_layout_transposes(sd_vae):
    vae, _, (_, params, _) = sd_vae
    state = vae.state_dict()
    conv = state["encoder.down_blocks.1.resnets.0.conv1.weight"].numpy()            # (O, I, kh, kw)
    kernel = params["encoder"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]     # (kh, kw, I, O)
    assert kernel[2, 0, 5, 7] == conv[7, 5, 2, 0]
    dense = state["encoder.mid_block.attentions.0.to_q.weight"].numpy()             # (O, I)
    assert params["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"][3, 11] == dense[11, 3]


@pytest.mark.parametrize("layout, torch_shape", [("conv", (5, 4, 3, 2)), ("dense", (5, 4)), ("vector", (6,))])
def test_shared_torch_layouts_are_exact_inverses(layout, torch_shape):
    """torch_weights (used by the VAE, U-Net, DiT and text-encoder maps): to_flax then to_torch is the identity and
    torch_shape is the torch shape of the flax array; a dense (O, I, 1, 1) is read as (I, O)."""
    array = np.arange(np.prod(torch_shape), dtype=np.float32).reshape(torch_shape)
    flax = torch_weights.to_flax_layout(array, layout)
    assert torch_weights.torch_shape(flax.shape, layout) == torch_shape
    np.testing.assert_array_equal(torch_weights.to_torch_layout(flax, layout), array)
    if layout == "dense":
        np.testing.assert_array_equal(torch_weights.to_flax_layout(array[:, :, None, None], "dense"), array.T)
    key_map = torch_weights.key_map_from_shapes({"block_0": {"kernel" if layout != "vector" else "bias": flax}},
                                                lambda path: ".".join(path))
    assert list(key_map.values())[0][1:] == (layout, flax.shape)


def test_deprecated_attention_names_load_identically(sd_vae, tmp_path):
    _, directory, (_, params, _) = sd_vae
    state = load_file(str(directory / diffusers_vae.WEIGHTS_FILE))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in state.items():
        for new_name, old_name in renames.items():
            if f".attentions.0.{new_name}." in key:
                key = key.replace(f".{new_name}.", f".{old_name}.")
                value = value[:, :, None, None] if value.ndim == 2 else value   # LDM stored them as 1x1 convs
        old[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, str(tmp_path / diffusers_vae.WEIGHTS_FILE))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _assert_trees_bitwise_equal(diffusers_vae.load_diffusers_autoencoder(tmp_path)[1], params)


def test_missing_unexpected_and_misshapen_keys_are_listed(sd_vae):
    vae, _, (_, _, config) = sd_vae
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    broken = dict(state)
    del broken["decoder.conv_out.bias"]
    broken["decoder.extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing keys \[decoder\.conv_out\.bias\]; unexpected keys "
                                         r"\[decoder\.extra_head\.weight\]"):
        diffusers_vae.from_diffusers_state_dict(broken, config)
    misshapen = dict(state, **{"encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"wrong shapes: \[encoder\.conv_in\.weight \(8, 3, 5, 5\) "
                                         r"\(expected torch shape \(8, 3, 3, 3\)\)\]"):
        diffusers_vae.from_diffusers_state_dict(misshapen, config)
    wider = config.replace(block_out_channels=(8, 16, 16))
    with pytest.raises(ValueError, match=r"missing keys \[decoder\.up_blocks\.1\.upsamplers\.0\.conv\.bias, .*"
                                         r"and 10 more\]; unexpected keys \[decoder\.up_blocks\.1\.resnets\.0\."
                                         r"conv_shortcut\.bias"):
        diffusers_vae.from_diffusers_state_dict(state, wider)


@pytest.mark.parametrize("override, message", [
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention=false"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types="),
    ({"_class_name": "AutoencoderTiny"}, "_class_name='AutoencoderTiny'"),
])
def test_unsupported_diffusers_configs_are_rejected(override, message):
    base = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}
    with pytest.raises(ValueError, match=message):
        diffusers_vae.autoencoder_config_from_diffusers({**base, **override})


def test_config_defaults_follow_diffusers_and_unknown_fields_are_logged(caplog):
    signature = inspect.signature(TorchAutoencoderKL.__init__).parameters
    torch_defaults = {name: list(p.default) if isinstance(p.default, tuple) else p.default
                      for name, p in signature.items() if name != "self"}
    assert torch_defaults == diffusers_vae._DIFFUSERS_DEFAULTS
    with caplog.at_level(logging.WARNING, logger=diffusers_vae.__name__):
        config = diffusers_vae.autoencoder_config_from_diffusers(
            {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "sample_size": 512, "force_upcast": True})
        assert caplog.records == []
        assert config == models.AutoencoderConfig(block_out_channels=(64,), layers_per_block=1)
        diffusers_vae.autoencoder_config_from_diffusers({"new_knob": 1, "latents_mean": [0.0] * 4})
    assert "ignoring unknown fields ['new_knob']" in caplog.text and "latents_mean/latents_std" in caplog.text


def test_missing_weights_file_error_lists_candidates(sd_vae, tmp_path):
    _, directory, _ = sd_vae
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"safetensors files there: \['diffusion_pytorch_model.fp16.safetensors'\]"):
        diffusers_vae.load_diffusers_autoencoder(tmp_path)


def test_save_for_diffusers_round_trips_through_torch(sd_vae, tmp_path):
    vae, _, (_, params, config) = sd_vae
    diffusers_vae.save_diffusers_autoencoder(tmp_path, params, config)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path)
    for key, value in vae.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert reloaded.config.scaling_factor == config.scaling_factor


def test_export_import_round_trips_bitwise(sd_vae, tmp_path):
    _, _, (_, params, config) = sd_vae
    out = safetensors_io.export_params(params, config, tmp_path / "vae")
    restored, values = safetensors_io.import_params(out)
    _assert_trees_bitwise_equal(restored, params)
    assert values == config.to_config()
    model, restored_again, restored_config = diffusers_vae.load_autoencoder(out)
    assert restored_config == config and isinstance(model, models.AutoencoderKL)
    # Any registry model: a tiny DiT rebuilds from the export and computes the same function.
    dit = models.get("dit-tiny")
    x, c_noise = jnp.ones((1, 16, 16, 1)), jnp.ones((1,))
    rng = np.random.RandomState(3)
    dit_params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                              jax.eval_shape(dit.init, jax.random.key(3), x, c_noise)["params"])
    dit_model, dit_restored, dit_config = safetensors_io.load_model(
        safetensors_io.export_params(dit_params, dit.config, tmp_path / "dit"))
    _assert_trees_bitwise_equal(dit_restored, dit_params)
    assert dit_config == dit.config
    assert jax.eval_shape(dit_model.apply, {"params": dit_restored}, x, c_noise).shape == x.shape


def test_safetensors_keep_every_dtype_and_header_config(tmp_path):
    tree = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7, "b": np.array([1, -2], np.int32)},
            "c": np.array([0.1, 3.3], ml_dtypes.bfloat16), "d": np.array(2.5, np.float16)}
    safetensors_io.write_safetensors(tmp_path / "t.safetensors", tree, {"k": "v"})
    restored, metadata = safetensors_io.read_safetensors(tmp_path / "t.safetensors")
    _assert_trees_bitwise_equal(restored, tree)
    assert metadata == {"k": "v"}
    out = safetensors_io.export_params({"x": np.zeros(2, np.float32)}, models.get_config("dit-tiny"), tmp_path / "e")
    (out / safetensors_io.CONFIG_FILE).unlink()
    assert safetensors_io.import_params(out)[1] == models.get_config("dit-tiny").to_config()
    with pytest.raises(ValueError, match="must be a non-empty str without '/'"):
        safetensors_io.flatten_tree({"a/b": np.zeros(1)})
    with pytest.raises(ValueError, match="config dict has name='nope'"):
        safetensors_io.export_params({"x": np.zeros(1)}, {"name": "nope"}, tmp_path / "bad")


def test_export_checkpoint_and_load_autoencoder_from_every_source(sd_vae, tmp_path):
    _, directory, (_, params, config) = sd_vae
    ema = jax.tree.map(lambda p: p * 0.5, params)
    run_config = {"model": config.to_config(), "schedule": {"name": "cosine"}}
    manager = CheckpointManager(tmp_path / "ckpt", async_save=False)
    manager.save(7, {"params": params, "ema_params": ema, "step": np.int32(7)}, run_config)
    manager.close()
    out = safetensors_io.export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    _assert_trees_bitwise_equal(safetensors_io.import_params(out)[0], ema)
    assert json.loads((out / safetensors_io.RUN_CONFIG_FILE).read_text()) == run_config
    for source, expected in ((directory, params), (out, ema), (tmp_path / "ckpt", ema)):
        _, loaded, loaded_config = diffusers_vae.load_autoencoder(source, dtype="bfloat16")
        _assert_trees_bitwise_equal(loaded, expected)
        assert loaded_config == config.replace(dtype="bfloat16")
    with pytest.raises(ValueError, match="holds a model with name='dit'; expected 'autoencoder'"):
        diffusers_vae.load_autoencoder(safetensors_io.export_params({"x": np.zeros(1)}, models.get_config("dit"),
                                                                    tmp_path / "dit"))
    with pytest.raises(ValueError, match="autoencoder params in .* missing \\[decoder/conv_in/bias"):
        diffusers_vae.load_autoencoder(safetensors_io.export_params(
            {"encoder": params["encoder"]}, config, tmp_path / "half"))
    with pytest.raises(ValueError, match="holds neither"):
        (tmp_path / "empty").mkdir()
        diffusers_vae.load_autoencoder(tmp_path / "empty")
