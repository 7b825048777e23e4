"""Sequence parallelism on a 4-device CPU mesh: each device attends only its own queries
(against all keys of its rows) and the numbers equal `vanilla` attention on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.runtime.mesh import batch_sharding, global_mesh
from raysft.workers.models.partition import param_sharding
from raysft.workers.models.attention import IMPLEMENTATIONS
from raysft.workers.models.auto import build_layout
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.training.step import make_gradient_fn
from test_train_step import assert_same_gradients, uneven_batch

SP_MESHES = [(1, 1, 1, 4), (1, 2, 1, 2), (1, 1, 2, 2)]


def _packed(t=512, heads=4, kv_heads=2, head_dim=16):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, t, heads, head_dim))
    k = jax.random.normal(keys[1], (2, t, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (2, t, kv_heads, head_dim))
    # Row 0: documents that cross the sequence shards' borders, then padding; row 1: one document.
    row0 = np.concatenate([np.full(t // 3, 1), np.full(t // 3, 2), np.zeros(t - 2 * (t // 3))])
    return q, k, v, jnp.asarray(np.stack([row0, np.ones(t)]), jnp.int32), jax.random.normal(keys[3], q.shape)


@pytest.mark.parametrize("dims", SP_MESHES, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("mechanism,window", [
    ("vanilla", None), ("blocked", None), ("blocked", 40), ("dot_product", 40), ("splash", None), ("splash", 40),
])
def test_sharded_attention_matches_vanilla(mechanism, window, dims):
    q, k, v, segment_ids, cotangent = _packed()
    attend = ModelRuntime(mechanism, mesh=global_mesh(*dims)).attention()
    reference = IMPLEMENTATIONS["vanilla"]

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids, window) * cotangent)

    np.testing.assert_allclose(
        jax.jit(lambda q, k, v: attend(q, k, v, segment_ids, window))(q, k, v),
        reference(q, k, v, segment_ids, window), atol=2e-5, rtol=0,
    )
    ours = jax.jit(jax.grad(objective(attend), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(objective(reference), argnums=(0, 1, 2))(q, k, v)
    for got, expected in zip(ours, want):
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return rs.AutoModelForCausalLM.from_pretrained(
        save_tiny_model(tmp_path_factory.mktemp("m"), vocab_size=96, architecture="qwen2", use_sliding_window=True,
                        sliding_window=12, max_window_layers=1)
    )


@pytest.mark.parametrize("dims", [*SP_MESHES, (2, 1, 1, 2), (2, 2, 1, 1)], ids=lambda d: "x".join(map(str, d)))
def test_whole_step_gradient_with_sequence_shards_matches_one_device(model, dims):
    """The whole model (layers with and without a window, scanned), the chunked loss over
    sequence shards and the per-replica embedding lookup (dp) against one device."""
    batch = uneven_batch(b=4, t=32, vocab=96)
    single, _ = jax.jit(make_gradient_fn(model.layout, loss_chunk_size=8))(model.params, batch)
    mesh = global_mesh(*dims)
    layout = build_layout(model.config, jnp.float32, jnp.float32, ModelRuntime("blocked", scan_layers=True, mesh=mesh))
    stacked = {}
    for name in layout.shapes:  # the unscanned parameters, stacked per layer
        if name in model.params:
            stacked[name] = model.params[name]
        else:
            stem = name.replace("model.layers.", "", 1)
            stacked[name] = jnp.stack([model.params[f"model.layers.{i}.{stem}"] for i in range(model.config.num_hidden_layers)])
    params = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in stacked.items()}
    rows = batch_sharding(mesh)
    grads, _ = jax.jit(make_gradient_fn(layout, loss_chunk_size=8, batch_sharding=rows))(
        params, {k: jax.device_put(v, rows) for k, v in batch.items()}
    )
    unstacked = {}
    for name, grad in grads.items():
        if name in single:
            unstacked[name] = np.asarray(grad)
        else:
            stem = name.replace("model.layers.", "", 1)
            for i in range(model.config.num_hidden_layers):
                unstacked[f"model.layers.{i}.{stem}"] = np.asarray(grad[i])
    assert_same_gradients({n: np.asarray(g) for n, g in single.items()}, unstacked, rtol=2e-6)
