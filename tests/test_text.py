"""Tests of the byte-level tokenizer and the text encoder (flaxdiff.models.text)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxdiff import models
from flaxdiff.models import text

INIT_KEY = jax.random.key(0, impl="unsafe_rbg")


def test_tokenize_layout_and_round_trip():
    ids, mask = models.tokenize(["hi", "", "héllo wörld"], max_len=16)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids[0, :4], [text.BOS_ID, ord("h") + 3, ord("i") + 3, text.EOS_ID])
    np.testing.assert_array_equal(ids[1, :3], [text.BOS_ID, text.EOS_ID, text.PAD_ID])
    np.testing.assert_array_equal(mask.sum(1), [4, 2, 2 + len("héllo wörld".encode())])
    assert models.detokenize(ids) == ["hi", "", "héllo wörld"]


def test_tokenize_truncates_but_keeps_eos():
    ids, mask = models.tokenize(["abcdefgh"], max_len=5)
    np.testing.assert_array_equal(ids[0], [text.BOS_ID, 97 + 3, 98 + 3, 99 + 3, text.EOS_ID])
    assert mask.all()


def test_tokenize_errors():
    with pytest.raises(ValueError, match="max_len=1 leaves no room"):
        models.tokenize(["a"], 1)
    with pytest.raises(ValueError, match="got a single str"):
        models.tokenize("abc", 8)


@pytest.fixture(scope="module")
def encoder():
    model = models.get("text_encoder-tiny")
    ids, mask = models.tokenize(["a red circle", "two"], model.config.max_len)
    params = jax.jit(lambda ids: model.init(INIT_KEY, ids)["params"])(jnp.asarray(ids))
    return model, params, jnp.asarray(ids), jnp.asarray(mask)


def test_encoder_shapes_and_padding_invariance(encoder):
    model, params, ids, mask = encoder
    forward = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask))
    tokens, pooled, out_mask = forward(ids, mask)
    assert tokens.shape == (2, 32, 32) and pooled.shape == (2, 32)
    np.testing.assert_array_equal(out_mask, mask)
    garbage = jnp.where(mask, ids, 77)   # change every padded id, keep the mask
    tokens2, pooled2, _ = forward(garbage, mask)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-5, atol=1e-5)
    valid = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.where(valid, tokens2, 0), np.where(valid, tokens, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, (tokens * valid).sum(1) / valid.sum(1), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(pooled[0] - pooled[1]))) > 1e-3


def test_encode_text_feeds_a_text_conditioned_dit(encoder):
    model, params, _, _ = encoder
    cond = models.encode_text(model, params, ["a red circle", "two"])
    assert set(cond) == {"text", "text_mask", "pooled"}
    dit = models.get("dit-tiny", text_dim=32, pooled_dim=32)
    x = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32)
    out = jax.eval_shape(lambda x: dit.init_with_output(INIT_KEY, x, jnp.zeros(2), cond)[0], x)
    assert out.shape == (2, 16, 16, 1)


def test_precomputed_embeddings_interface():
    emb = jnp.ones((3, 7, 48))
    cond = models.text_condition(emb, pooled=jnp.ones((3, 16)))
    assert cond["text_mask"].shape == (3, 7) and bool(cond["text_mask"].all())
    with pytest.raises(ValueError, match=r"text embeddings must be \(B, L, D\); got shape \(3, 48\)"):
        models.text_condition(jnp.ones((3, 48)))
    with pytest.raises(ValueError, match=r"text mask has shape \(3, 6\); expected \(3, 7\)"):
        models.text_condition(emb, jnp.ones((3, 6), bool))
    with pytest.raises(ValueError, match=r"ids have shape \(1, 40\); expected \(B, L\) with L <= max_len=32"):
        model = models.get("text_encoder-tiny")
        jax.eval_shape(model.init, INIT_KEY, jnp.zeros((1, 40), jnp.int32))
