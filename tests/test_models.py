"""Tests of flaxdiff.models: U-Net, DiT, shared layers, registry and summary."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from flaxdiff import losses, models, predictors, schedules
from flaxdiff.models import layers

KEY = jax.random.key(0)
INIT_KEY = jax.random.key(0, impl="unsafe_rbg")
TEXT_DIM, POOLED_DIM, NUM_CLASSES = 24, 8, 10


def _cond(batch, label=True, text=True, pooled=False, seed=1):
    rng = np.random.RandomState(seed)
    cond = {}
    if label:
        cond["label"] = jnp.asarray(rng.randint(0, NUM_CLASSES, batch), jnp.int32)
    if text:
        cond["text"] = jnp.asarray(rng.randn(batch, 5, TEXT_DIM), jnp.float32)
        cond["text_mask"] = jnp.asarray(np.arange(5)[None, :] < rng.randint(1, 6, (batch, 1)))
    if pooled:
        cond["pooled"] = jnp.asarray(rng.randn(batch, POOLED_DIM), jnp.float32)
    return cond


def _init(model, x, cond):
    """Real (Flax) initialisation, jitted; the RBG key keeps XLA:CPU compile time low."""
    init = jax.jit(lambda x, c, cond: model.init({"params": INIT_KEY, "dropout": INIT_KEY}, x, c, cond)["params"])
    return init(x, jnp.zeros(x.shape[0]), cond)


def _random_params(model, x, cond, seed=3):
    """Random non-zero parameters drawn on the host with numpy (no compile): kernels ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.1^2), everything else ~ N(0, 0.1^2). Zero-initialised output layers then
    no longer hide the network."""
    abstract = jax.eval_shape(model.init, {"params": KEY, "dropout": KEY}, x, jnp.zeros(x.shape[0]), cond)
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * noise if name == "scale" else 0.1 * noise)

    return jax.tree_util.tree_map_with_path(draw, abstract["params"])


def _abstract_apply(model, x_shape, cond):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    c = jax.ShapeDtypeStruct(x_shape[:1], jnp.float32)

    def run(x, c):
        params = model.init({"params": KEY, "dropout": KEY}, x, c, cond)
        return model.apply(params, x, c, cond)

    return jax.eval_shape(run, x, c)


# ----------------------------------------------------------------------------------------------- layers


def test_sinusoidal_embedding_closed_form():
    c = jnp.array([0.0, 1.0, 1000.0, -1.5])
    emb = layers.sinusoidal_embedding(c, 8)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer(c, freqs)), np.sin(np.outer(c, freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


def test_fourier_embedding_is_deterministic_from_config():
    c = jnp.array([-0.5, 0.25])
    np.testing.assert_array_equal(layers.fourier_embedding(c, 16, 16.0), layers.fourier_embedding(c, 16, 16.0))
    freqs = np.random.RandomState(0).standard_normal(8) * 16.0
    np.testing.assert_allclose(layers.fourier_embedding(c, 16)[:, :8], np.cos(2 * np.pi * np.outer(c, freqs)),
                               rtol=1e-4, atol=1e-4)


def test_sincos_2d_rows_and_columns():
    emb = layers.sincos_2d(8, 3, 4)
    assert emb.shape == (12, 8)
    grid = emb.reshape(3, 4, 8)
    np.testing.assert_array_equal(grid[:, 0, :4], grid[:, 3, :4])   # first half depends on the row only
    np.testing.assert_array_equal(grid[0, :, 4:], grid[2, :, 4:])   # second half on the column only
    np.testing.assert_allclose(grid[0, 0], [0, 0, 1, 1, 0, 0, 1, 1])


def test_attention_null_kv_for_fully_masked_context():
    attn = layers.Attention(2, 4, 8, null_kv=True)
    x = jax.random.normal(KEY, (2, 3, 8))
    context = jax.random.normal(jax.random.key(1), (2, 5, 6))
    none = jnp.zeros((2, 5), bool)

    @jax.jit
    def run(context):
        params = attn.init(KEY, x, context)
        return attn.apply(params, x, context, none), attn.apply(params, x, 10 * context + 1, none)

    out, other = run(context)
    np.testing.assert_allclose(out, other, atol=1e-6)   # masked tokens are ignored entirely
    assert np.all(np.isfinite(out))


def test_attention_matches_explicit_softmax():
    attn = layers.Attention(2, 4, 8)
    x = jax.random.normal(KEY, (1, 5, 8))

    @jax.jit
    def run(x):
        p = attn.init(KEY, x)["params"]
        q = (x @ p["to_q"]["kernel"] + p["to_q"]["bias"]).reshape(1, 5, 2, 4)
        k = (x @ p["to_k"]["kernel"] + p["to_k"]["bias"]).reshape(1, 5, 2, 4)
        v = (x @ p["to_v"]["kernel"] + p["to_v"]["bias"]).reshape(1, 5, 2, 4)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(1, 5, 8)
        return attn.apply({"params": p}, x), o @ p["to_out"]["kernel"] + p["to_out"]["bias"]

    out, expected = run(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_path_equals_the_softmax_formula_values_and_gradients(masked, x64):
    keys = jax.random.split(KEY, 5)
    q = jax.random.normal(keys[0], (3, 7, 2, 4), jnp.float64)
    k, v = (jax.random.normal(kk, (3, 9, 2, 4), jnp.float64) for kk in keys[1:3])
    cot = jax.random.normal(keys[3], (3, 7, 2, 4), jnp.float64)
    mask = jax.random.bernoulli(keys[4], 0.6, (3, 1, 1, 9)).at[:, :, :, 0].set(True) if masked else None

    def formula(q, k, v):   # the definition, in float64 throughout
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)

    assert jax.default_backend() == "cpu"   # the heads-major path is the one under test
    out = layers.dot_product_attention(q, k, v, mask)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, formula(q, k, v), rtol=1e-12, atol=1e-13)
    ours = jax.grad(lambda *a: jnp.vdot(layers.dot_product_attention(*a, mask), cot), (0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: jnp.vdot(formula(*a), cot), (0, 1, 2))(q, k, v)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if masked:   # a masked key gets no gradient at all
        dead = ~np.asarray(mask[:, 0, 0, :])
        assert dead.any() and np.all(np.asarray(ours[1])[dead] == 0)


# ----------------------------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
@pytest.mark.parametrize("kind", ["uncond", "class", "text", "all"])
def test_output_shapes(name, kind):
    conditioning = {"uncond": {}, "class": {"num_classes": NUM_CLASSES}, "text": {"text_dim": TEXT_DIM},
                    "all": {"num_classes": NUM_CLASSES, "text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM}}[kind]
    model = models.get(name, **conditioning)
    cond = None if kind == "uncond" else _cond(3, label="num_classes" in conditioning,
                                                text="text_dim" in conditioning,
                                                pooled="pooled_dim" in conditioning)
    out = _abstract_apply(model, (3, 16, 24, 1), cond)
    assert out.shape == (3, 16, 24, 1) and out.dtype == jnp.float32


def test_dit_learn_sigma_doubles_channels():
    model = models.get("dit-tiny", learn_sigma=True, in_channels=3)
    assert _abstract_apply(model, (2, 8, 8, 3), None).shape == (2, 8, 8, 6)


def test_unet_options_shapes():
    model = models.get("unet-tiny", channel_mult=(1, 2, 2), resblock_updown=True, num_head_channels=8,
                       attention_levels=(0, 2), use_scale_shift_norm=False, out_channels=2,
                       noise_embedding="fourier", dropout=0.1)
    assert _abstract_apply(model, (2, 8, 12, 1), None).shape == (2, 8, 12, 2)


def test_space_to_depth_layout_and_round_trip():
    from flaxdiff.models.unet import depth_to_space, space_to_depth

    x = jax.random.normal(KEY, (2, 6, 4, 3))
    packed = space_to_depth(x, 2)
    assert packed.shape == (2, 3, 2, 12)
    for i in range(2):
        for j in range(2):   # channel block (i * p + j) holds pixel (p y + i, p x + j)
            np.testing.assert_array_equal(packed[..., (i * 2 + j) * 3:(i * 2 + j + 1) * 3], x[:, i::2, j::2, :])
    np.testing.assert_array_equal(depth_to_space(packed, 2), x)


def test_patched_unet_shapes_zero_init_and_cost():
    plain, patched = models.get("unet-tiny"), models.get("unet-tiny", patch_size=2, out_channels=2)
    x = jax.random.normal(KEY, (2, 16, 16, 1))
    params = _init(patched, x, None)
    assert params["conv_in"]["kernel"].shape == (3, 3, 4, 16)        # 2x2x1 pixels per position in
    assert params["conv_out"]["kernel"].shape == (3, 3, 16, 8)       # 2x2x2 values per position out
    out = _forward(patched, params, x, jnp.zeros(2), None)   # jitted: one compile, not one per op
    assert out.shape == (2, 16, 16, 2) and not np.any(np.asarray(out))   # zero-initialised conv_out

    def flops(model):
        p = jax.eval_shape(lambda: model.init(INIT_KEY, x, jnp.zeros(2)))
        cost = jax.jit(lambda p, x: model.apply(p, x, jnp.zeros(2))).lower(p, x).cost_analysis()  # of the HLO
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert flops(plain) / flops(patched) > 3.0   # every feature map is 4x smaller
    with pytest.raises(ValueError, match=r"image size 14x16 is not divisible by 4 \(patch_size 2 and 1 downsampl"):
        _abstract_apply(patched, (2, 14, 16, 1), None)
    with pytest.raises(ValueError, match="patch_size=0 must be a positive integer"):
        _abstract_apply(models.get("unet-tiny", patch_size=0), (2, 16, 16, 1), None)


@pytest.mark.parametrize("name, shape, message", [
    ("unet-tiny", (2, 15, 16, 1), "image size 15x16 is not divisible by 2"),
    ("dit-tiny", (2, 16, 18, 1), "image size 16x18 is not divisible by 4"),
    ("unet-tiny", (2, 16, 16, 3), "x has 3 channels but the model expects in_channels=1"),
    ("dit-tiny", (2, 16, 16, 2), "x has 2 channels but the model expects in_channels=1"),
])
def test_bad_inputs_are_rejected(name, shape, message):
    with pytest.raises(ValueError, match=message):
        _abstract_apply(models.get(name), shape, None)


@pytest.mark.parametrize("name", ["unet-tiny", "dit-tiny"])
def test_conditioning_errors(name):
    with pytest.raises(ValueError, match="text_dim=24 but cond has no 'text'"):
        _abstract_apply(models.get(name, text_dim=TEXT_DIM), (2, 16, 16, 1), {})
    with pytest.raises(ValueError, match=r"cond\['text'\] has shape \(2, 5, 7\); expected \(2, L, 24\)"):
        _abstract_apply(models.get(name, text_dim=TEXT_DIM), (2, 16, 16, 1), {"text": jnp.zeros((2, 5, 7))})
    with pytest.raises(ValueError, match="num_classes=0"):
        _abstract_apply(models.get(name), (2, 16, 16, 1), {"label": jnp.zeros(2, jnp.int32)})
    with pytest.raises(ValueError, match="unknown conditioning keys"):
        _abstract_apply(models.get(name), (2, 16, 16, 1), {"labels": jnp.zeros(2, jnp.int32)})


def test_groupnorm_and_heads_errors():
    with pytest.raises(ValueError, match="16 channels are not divisible by norm_num_groups=32"):
        _abstract_apply(models.get("unet-tiny", norm_num_groups=32), (1, 8, 8, 1), None)
    with pytest.raises(ValueError, match="hidden_size=64 is not divisible by num_heads=3"):
        _abstract_apply(models.get("dit-tiny", num_heads=3), (1, 8, 8, 1), None)


# ----------------------------------------------------------------------------------------------- DiT presets


PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
@pytest.mark.parametrize("patch", [2, 8])
def test_dit_preset_param_counts_match_paper(size, patch):
    model = models.get(f"DiT-{size}/{patch}")
    shapes = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 32, 32, 4)), jnp.zeros(1),
                                               {"label": jnp.zeros(1, jnp.int32)}))
    count = models.count_params(shapes["params"])
    assert abs(count - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01, count


# ----------------------------------------------------------------------------------------------- behaviour


def _forward_impl(model, params, x, c_noise, cond):
    return model.apply({"params": params}, x, c_noise, cond)


_forward = jax.jit(_forward_impl, static_argnums=0)  # one compile per (model, input structure), shared


@pytest.fixture(scope="module")
def dit_conditional():
    model = models.get("dit-tiny", num_classes=NUM_CLASSES, text_dim=TEXT_DIM, learn_sigma=True)
    x = jax.random.normal(KEY, (4, 16, 16, 1))
    cond = _cond(4)
    return model, x, cond, _init(model, x, cond)


def test_fresh_dit_outputs_exactly_zero(dit_conditional):
    model, x, cond, params = dit_conditional
    out = _forward(model, params, x, jnp.linspace(0, 999, 4), cond)
    assert out.shape == (4, 16, 16, 2)
    assert np.all(np.asarray(out) == 0.0)


def test_dit_label_and_text_matter_after_training(dit_conditional):
    model, x, cond, params = dit_conditional
    c_noise = jnp.linspace(0, 999, 4)
    target = jax.random.normal(jax.random.key(5), (4, 16, 16, 2))
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x, c_noise, cond) - target) ** 2))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    for _ in range(3):
        params, opt_state = step(params, opt_state)
    base = _forward(model, params, x, c_noise, cond)
    other_label = _forward(model, params, x, c_noise, dict(cond, label=(cond["label"] + 1) % NUM_CLASSES))
    other_text = _forward(model, params, x, c_noise, dict(cond, text=cond["text"] + 1.0))
    assert float(jnp.max(jnp.abs(base))) > 1e-3
    assert float(jnp.max(jnp.abs(other_label - base))) > 1e-4
    assert float(jnp.max(jnp.abs(other_text - base))) > 1e-4


@pytest.fixture(scope="module", params=["unet-tiny", "dit-tiny"])
def class_model(request):
    """A class-conditional tiny model with perturbed (non-zero) parameters, shared by the next tests."""
    model = models.get(request.param, num_classes=NUM_CLASSES)
    x = jax.random.normal(KEY, (2, 8, 8, 1))
    return request.param, model, x, _random_params(model, x, None)


def test_null_class_is_the_unconditional_path(class_model):
    _, model, x, params = class_model
    c_noise = jnp.array([3.0, 700.0])
    uncond = _forward(model, params, x, c_noise, None)
    null = _forward(model, params, x, c_noise, {"label": jnp.full((2,), NUM_CLASSES, jnp.int32)})
    labelled = _forward(model, params, x, c_noise, {"label": jnp.array([0, 1], jnp.int32)})
    np.testing.assert_allclose(uncond, null, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(labelled - uncond))) > 1e-3


BF16_TOLERANCE = 0.05  # relative L2 error of the bfloat16-compute output vs float32


def test_bfloat16_compute_close_to_float32(class_model):
    name, model, x, params = class_model
    bf16 = models.get(name, num_classes=NUM_CLASSES, dtype="bfloat16")
    abstract = jax.eval_shape(bf16.init, KEY, x, jnp.zeros(2), None)["params"]
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    c_noise, cond = jnp.array([3.0, 700.0]), {"label": jnp.array([0, 1], jnp.int32)}
    ref = _forward(model, params, x, c_noise, cond)
    low = _forward(bf16, params, x, c_noise, cond)
    assert low.dtype == jnp.float32
    rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
    assert 0.0 < rel < BF16_TOLERANCE, rel


@pytest.mark.parametrize("name, overrides", [
    ("dit-tiny", {"text_dim": TEXT_DIM, "depth": 1}),
    ("unet-tiny", {"channel_mult": (1,), "num_res_blocks": 0, "dropout": 0.2}),
])
def test_remat_gives_same_outputs_and_gradients(name, overrides):
    plain, remat = models.get(name, **overrides), models.get(name, remat=True, **overrides)
    x = jax.random.normal(KEY, (2, 8, 8, 1))
    cond = _cond(2, label=False) if "text_dim" in overrides else None
    params = _random_params(plain, x, cond)
    abstract = jax.eval_shape(remat.init, {"params": KEY, "dropout": KEY}, x, jnp.zeros(2), cond)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    c_noise = jnp.array([10.0, 900.0])

    def loss(p, model):
        out = model.apply({"params": p}, x, c_noise, cond, train=True, rngs={"dropout": jax.random.key(7)})
        return jnp.sum(out ** 2), out

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, o1), g1 = grad(params, plain)
    (_, o2), g2 = grad(params, remat)
    np.testing.assert_allclose(o1, o2, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- overfitting

# the fixed-draw eval loss must fall by OVERFIT_FACTOR within the given number of adam steps (lr 3e-3);
# measured (jax 0.10.2): unet-tiny x7.7 in 50 steps (x8.8 in 80), dit-tiny x6.6 in 120 steps (x7.5 in 200),
# unet-tiny with 2x2 patches x5.1 in 80 steps
OVERFIT_FACTOR = 5.0


@pytest.fixture(scope="module")
def digits():
    """8 fixed sklearn digits, 8x8 upsampled to 16x16, scaled to [-1, 1], shape (8, 16, 16, 1)."""
    images = load_digits().images[:8] / 16.0 * 2.0 - 1.0
    return jnp.asarray(np.kron(images, np.ones((2, 2)))[..., None], jnp.float32)


def _eps_loss(model, params, x0, key):
    """flaxdiff's diffusion loss: epsilon prediction, linear-beta VP schedule, uniform t, unit weight."""
    loss, _ = losses.diffusion_loss(
        lambda p, x, c_noise, cond: model.apply({"params": p}, x, c_noise, cond), params, x0, None, key,
        schedules.get("linear"), predictors.get("epsilon"), losses.weightings.get("uniform"),
        losses.time_samplers.get("uniform"))
    return loss


def _adam_update(opt, params, grads, opt_state):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("name, overrides, steps", [("unet-tiny", {}, 50), ("dit-tiny", {}, 120),
                                                   ("unet-tiny", {"patch_size": 2}, 80)])
def test_tiny_model_overfits_eight_digits(name, overrides, steps, digits):
    model = models.get(name, **overrides)
    params = _init(model, digits, None)
    opt = optax.adam(3e-3)
    # one compiled loss-and-gradient serves training and evaluation; a Python loop over it, because
    # XLA:CPU runs convolutions inside lax.scan about 10x slower than in a top-level computation
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, key: _eps_loss(model, p, digits, key)))
    update = jax.jit(lambda params, grads, opt_state: _adam_update(opt, params, grads, opt_state))

    def evaluate(params):  # the same 4 (t, eps) draws before and after training
        return np.mean([float(loss_and_grad(params, jax.random.key(100 + i))[0]) for i in range(4)])

    before = evaluate(params)
    opt_state = opt.init(params)
    for key in jax.random.split(jax.random.key(1), steps):
        params, opt_state = update(params, loss_and_grad(params, key)[1], opt_state)
    after = evaluate(params)
    assert before / after > OVERFIT_FACTOR, (before, after)


# ----------------------------------------------------------------------------------------------- registry, summary


def test_registry_names():
    names = models.available()
    for required in ["unet", "dit", "autoencoder", "text_encoder", "unet-tiny", "unet-small"]:
        assert required in names
    for size in ["S", "B", "L", "XL"]:
        for patch in [2, 4, 8]:
            assert f"DiT-{size}/{patch}" in names
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'"):
        models.get("DiT-M/2")
    with pytest.raises(ValueError, match=r"unknown DiTConfig fields \['width'\]"):
        models.get("dit", width=3)


@pytest.mark.parametrize("name", models.available())
def test_every_config_round_trips_through_json(name):
    module = models.get(name)
    saved = json.loads(json.dumps(module.config.to_config()))
    assert saved["name"] in {"unet", "dit", "autoencoder", "text_encoder"}
    rebuilt = models.from_config(saved)
    assert type(rebuilt) is type(module) and rebuilt.config == module.config
    assert hash(rebuilt.config) == hash(module.config)


def test_get_with_overrides_and_bad_config_name():
    model = models.get("DiT-S/2", num_classes=10, learn_sigma=False)
    assert (model.config.hidden_size, model.config.depth, model.config.num_classes) == (384, 12, 10)
    with pytest.raises(ValueError, match="config dict has name='vit'"):
        models.from_config({"name": "vit"})


def test_summary_dense_closed_form():
    import flax.linen as nn
    info = models.summary(nn.Dense(16), jnp.zeros((4, 8)))
    assert info["params"] == 8 * 16 + 16
    assert 2 * 4 * 8 * 16 <= info["flops"] <= 2 * 4 * 8 * 16 + 2 * 4 * 16


def test_summary_of_diffusion_model():
    model = models.get("dit-tiny")
    x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
    info = models.summary(model, x, jax.ShapeDtypeStruct((2,), jnp.float32), None)
    shapes = jax.eval_shape(model.init, KEY, x, jax.ShapeDtypeStruct((2,), jnp.float32), None)
    assert info["params"] == models.count_params(shapes["params"]) == 168144
    # the MLPs alone cost 2 * (2 batch * 16 tokens) * (64 * 256 * 2) flops per block
    assert info["flops"] > 2 * 2 * (2 * 16) * (64 * 256 * 2)


def test_summary_flops_match_dit_paper():
    """DiT-S/2 at 32x32x4 is 6.06 GFLOPs in the paper (which counts a multiply-add once); XLA counts it twice."""
    model = models.get("DiT-S/2")
    info = models.summary(model, jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.float32), {"label": jnp.zeros(1, jnp.int32)})
    assert info["flops"] / 2 / 1e9 == pytest.approx(6.06, rel=0.02)
