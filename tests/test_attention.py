"""Every attention mechanism against `vanilla`, forward and backward, on packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.models.attention import IMPLEMENTATIONS, attention_mask, resolve_mechanism


def _packed_inputs(t=128, heads=4, kv_heads=2, head_dim=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, t, heads, head_dim))
    k = jax.random.normal(keys[1], (2, t, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (2, t, kv_heads, head_dim))
    # Row 0: three documents then padding; row 1: one document filling the row.
    row0 = np.concatenate([np.full(40, 1), np.full(50, 2), np.full(30, 3), np.zeros(t - 120)])
    segment_ids = jnp.asarray(np.stack([row0, np.ones(t)]), jnp.int32)
    return q, k, v, segment_ids


def test_mask_is_causal_same_document_and_windowed():
    segment_ids = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    mask = np.asarray(attention_mask(segment_ids, window=2))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("window", [None, 24, 100], ids=["full", "window24", "window100"])
@pytest.mark.parametrize("mechanism", ["blocked", "dot_product", "splash"])
def test_mechanism_matches_vanilla_forward_and_gradients(mechanism, window):
    # blocked gets a row length that leaves a ragged last block; splash needs whole tiles.
    q, k, v, segment_ids = _packed_inputs(t=136 if mechanism == "blocked" else 128)
    vanilla, other = IMPLEMENTATIONS["vanilla"], IMPLEMENTATIONS[mechanism]
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids, window) * cotangent)

    np.testing.assert_allclose(
        other(q, k, v, segment_ids, window), vanilla(q, k, v, segment_ids, window), atol=2e-5, rtol=0
    )
    ours = jax.grad(objective(other), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(objective(vanilla), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mechanism", ["blocked", "dot_product", "splash"])
def test_mechanism_scales_and_soft_caps_as_vanilla(mechanism):
    """Gemma 2's scale (1/sqrt(query_pre_attn_scalar)) and attention-logit cap, windowed;
    a cap of 1 bends most scores, so a mechanism that skipped it would be far off."""
    q, k, v, segment_ids = _packed_inputs()
    vanilla, other = IMPLEMENTATIONS["vanilla"], IMPLEMENTATIONS[mechanism]
    settings = dict(scale=0.3, softcap=1.0)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def objective(fn, **kw):
        return lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids, 24, **kw) * cotangent)

    want = vanilla(q, k, v, segment_ids, 24, **settings)
    np.testing.assert_allclose(other(q, k, v, segment_ids, 24, **settings), want, atol=2e-5, rtol=0)
    assert np.abs(np.asarray(want - vanilla(q, k, v, segment_ids, 24, scale=0.3))).max() > 0.1
    ours = jax.grad(objective(other, **settings), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(objective(vanilla, **settings), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_auto_picks_the_platform_kernel():
    assert resolve_mechanism("auto", "cpu") == "blocked"
    assert resolve_mechanism("auto", "gpu") == "dot_product"
    assert resolve_mechanism("auto", "tpu") == "splash"
    with pytest.raises(ValueError, match="attn_mechanism 'flash' is not one of auto, vanilla, blocked, dot_product, splash"):
        resolve_mechanism("flash")


@pytest.mark.parametrize("mechanism", ["blocked", "dot_product", "splash"])
def test_whole_model_agrees_across_mechanisms(tmp_path, mechanism):
    """Gemma 2's cap is checked mechanism by mechanism above, and its scanned splash
    branches compiled for a TPU (`test_tpu_compile.py`); the whole-model check of a
    scanned Gemma 2 through splash's interpreter took 27 s."""
    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture="mistral", sliding_window=32, head_dim=8)
    input_ids = np.random.default_rng(0).integers(0, 97, size=(1, 128))
    segment_ids = np.concatenate([np.full(70, 1), np.full(58, 2)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(70), np.arange(58)])[None].astype(np.int32)
    ref = rs.AutoModelForCausalLM.from_pretrained(model_dir, attn_mechanism="vanilla")
    other = rs.AutoModelForCausalLM.from_pretrained(model_dir, attn_mechanism=mechanism)
    np.testing.assert_allclose(
        other(input_ids, segment_ids, positions), ref(input_ids, segment_ids, positions), atol=1e-5, rtol=0
    )
