"""Tests of the expert-choice mixture of experts (flaxdiff.models.moe) and the MoE DiT."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxdiff import losses, predictors, schedules
from flaxdiff import models
from flaxdiff.models import moe

BATCH, TOKENS, WIDTH, HIDDEN, EXPERTS = 3, 12, 8, 16, 4


def _module(capacity_factor):
    return moe.ExpertChoiceMLP(EXPERTS, HIDDEN, capacity_factor)


@pytest.fixture(scope="module")
def moe_setup():
    """Input (B, T, D) and float64 numpy params with non-zero biases, so that the references check them too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, TOKENS, WIDTH))
    params = {"router": {"kernel": rng.standard_normal((WIDTH, EXPERTS))},
              "w1": rng.standard_normal((EXPERTS, WIDTH, HIDDEN)) / 3, "b1": rng.standard_normal((EXPERTS, HIDDEN)),
              "w2": rng.standard_normal((EXPERTS, HIDDEN, WIDTH)) / 4, "b2": rng.standard_normal((EXPERTS, WIDTH))}
    shapes = jax.eval_shape(lambda: _module(1.0).init(jax.random.key(1), jnp.asarray(x, jnp.float32))["params"])
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, params)
    return x, params


def _apply(capacity_factor, params, x):
    params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return np.asarray(_module(capacity_factor).apply({"params": params32}, jnp.asarray(x, jnp.float32)))


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _expert(params, e, tokens):
    """Expert e's MLP in numpy: W2 gelu_tanh(W1 x + b1) + b2."""
    h = tokens @ params["w1"][e] + params["b1"][e]
    h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ params["w2"][e] + params["b2"][e]


def test_capacity_formula_and_errors():
    assert moe.expert_capacity(256, 8, 2.0) == 64
    assert moe.expert_capacity(12, 4, 4.0) == 12      # c = E: every token
    assert moe.expert_capacity(12, 4, 100.0) == 12    # clipped to T
    assert moe.expert_capacity(3, 8, 1.0) == 1        # at least one
    with pytest.raises(ValueError, match="capacity_factor=0.0 must be > 0"):
        moe.expert_capacity(12, 4, 0.0)
    with pytest.raises(ValueError, match="num_experts=0 must be >= 1"):
        moe.expert_capacity(12, 0, 1.0)


def test_each_expert_takes_exactly_its_capacity_of_top_tokens():
    logits = jax.random.normal(jax.random.key(2), (BATCH, TOKENS, EXPERTS))
    capacity = moe.expert_capacity(TOKENS, EXPERTS, 1.0)
    gates, indices, probs = moe.expert_choice_route(logits, capacity)
    assert indices.shape == gates.shape == (BATCH, EXPERTS, capacity) == (BATCH, EXPERTS, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)    # softmax over experts
    probs, indices, gates = map(np.asarray, (probs, indices, gates))
    for b in range(BATCH):
        for e in range(EXPERTS):
            chosen = indices[b, e]
            assert len(set(chosen.tolist())) == capacity                         # k distinct tokens
            np.testing.assert_allclose(gates[b, e], probs[b, chosen, e], rtol=1e-6)
            others = np.setdiff1d(np.arange(TOKENS), chosen)
            assert probs[b, chosen, e].min() >= probs[b, others, e].max()     # the expert's top-k


def test_output_matches_per_expert_loop_reference(moe_setup):
    x, params = moe_setup
    out = _apply(1.0, params, x)
    probs = _softmax(x @ params["router"]["kernel"])
    expected = np.zeros(x.shape)
    for b in range(BATCH):
        for e in range(EXPERTS):
            idx = np.argsort(-probs[b, :, e])[:3]                    # capacity round(1.0 * 12 / 4) = 3
            expected[b, idx] += probs[b, idx, e][:, None] * _expert(params, e, x[b, idx])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert np.any(np.all(expected == 0.0, axis=-1))                 # some token no expert took: its output is zero
    np.testing.assert_array_equal(out[np.all(expected == 0.0, axis=-1)], 0.0)


def test_full_capacity_equals_dense_mixture(moe_setup):
    x, params = moe_setup
    out = _apply(float(EXPERTS), params, x)
    probs = _softmax(x @ params["router"]["kernel"])
    dense = sum(probs[..., e:e + 1] * _expert(params, e, x) for e in range(EXPERTS))
    np.testing.assert_allclose(out, dense, rtol=1e-4, atol=1e-4)


def test_routing_is_per_example(moe_setup):
    x, params = moe_setup
    changed = x.copy()
    changed[1:] = np.random.default_rng(5).standard_normal(x[1:].shape)
    full = _apply(1.0, params, x)
    np.testing.assert_allclose(_apply(1.0, params, changed)[0], full[0], rtol=1e-6)
    np.testing.assert_allclose(_apply(1.0, params, x[:1])[0], full[0], rtol=1e-5, atol=1e-6)


def test_moe_dit_alternate_blocks_and_expert_axis():
    model = models.get("dit-tiny", depth=4, num_experts=EXPERTS, capacity_factor=2.0)
    x = jnp.zeros((1, 16, 16, 1))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)))["params"])
    with_moe = [name for name in params if "moe" in params[name]]
    assert with_moe == ["blocks_1", "blocks_3"]
    assert all("mlp_fc1" in params[f"blocks_{i}"] for i in (0, 2))
    assert params["blocks_1"]["moe"]["w1"].shape == (EXPERTS, 64, 256)
    assert moe.expert_partition_spec("w1", 3) == jax.sharding.PartitionSpec("fsdp", None, None)
    assert moe.expert_partition_spec("kernel", 2) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="moe_every=0 must be >= 1"):
        models.get("dit-tiny", num_experts=2, moe_every=0).init(jax.random.key(0), x, jnp.zeros((1,)))


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding
    from flaxdiff.models import moe
    module = moe.ExpertChoiceMLP(4, 16, 2.0)
    x = jax.random.normal(jax.random.key(0), (4, 12, 8))
    params = module.init(jax.random.key(1), x)["params"]
    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 4), ("data", "fsdp"))
    specs = {k: moe.expert_partition_spec(k, np.ndim(v) if k != "router" else 0) for k, v in params.items()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    assert len(sharded["w1"].addressable_shards) == 4 and sharded["w1"].addressable_shards[0].data.shape[0] == 1
    out = jax.jit(lambda p, v: module.apply({"params": p}, v))(sharded, x)
    np.testing.assert_allclose(out, module.apply({"params": params}, x), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_expert_sharded_params_give_the_same_output():
    from conftest import host_devices_env

    env = host_devices_env(4)
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def _adam_update(opt, params, grads, opt_state):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def test_tiny_moe_dit_loss_decreases():
    model = models.get("dit-tiny", num_experts=EXPERTS, capacity_factor=2.0)
    x0 = jnp.tanh(jax.random.normal(jax.random.key(3), (8, 16, 16, 1)))
    params = model.init(jax.random.key(0), x0, jnp.zeros((8,)))["params"]
    opt = optax.adam(3e-3)

    def loss_fn(p, key):
        return losses.diffusion_loss(lambda q, x, c, cond: model.apply({"params": q}, x, c, cond, train=True), p, x0,
                                     None, key, schedules.get("linear"), predictors.get("epsilon"),
                                     losses.weightings.get("uniform"), losses.time_samplers.get("uniform"))[0]

    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))   # one compiled forward-backward for training and eval
    update = jax.jit(lambda p, grads, state: _adam_update(opt, p, grads, state))

    def evaluate(p):  # the same 4 (t, eps) draws before and after training
        return np.mean([float(loss_and_grad(p, jax.random.key(100 + i))[0]) for i in range(4)])

    before, opt_state = evaluate(params), opt.init(params)
    for key in jax.random.split(jax.random.key(1), 30):
        params, opt_state = update(params, loss_and_grad(params, key)[1], opt_state)
    after = evaluate(params)
    assert after < 0.8 * before, (before, after)
    assert float(jnp.abs(params["blocks_1"]["moe"]["w1"]).sum()) > 0
