"""The jitted training step: token-exact gradient accumulation and sharding that never
changes the numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.runtime.mesh import batch_sharding, global_mesh
from raysft.workers.models.partition import param_sharding
from raysft.workers.training.step import make_eval_step, make_gradient_fn, make_train_step


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return rs.AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("m"), vocab_size=97))


def uneven_batch(b=8, t=32, seed=0, vocab=97):
    """Rows whose supervised-token counts differ wildly (1 to all), as chat masks do."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((b, t), np.float32)
    for r in range(b):
        weights[r, rng.integers(1, t) :] = 1.0
    weights[0, :] = 0.0
    weights[0, -1] = 1.0
    return {
        "input_ids": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        "loss_weights": jnp.asarray(weights),
    }


def gradient(model, batch, accumulation=1, mesh=None):
    """The step's gradient and loss, on one device or sharded over `mesh`."""
    params, rows = model.params, None
    if mesh is not None:
        rows = batch_sharding(mesh)
        params = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in params.items()}
        batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    grads, sums = jax.jit(make_gradient_fn(model.layout, gradient_accumulation_steps=accumulation, batch_sharding=rows))(
        params, batch
    )
    return {n: np.asarray(g) for n, g in grads.items()}, float(sums["loss_sum"] / sums["weight_sum"])


def assert_same_gradients(a, b, rtol=1e-6):
    for name in a:
        scale = np.abs(a[name]).max()
        np.testing.assert_allclose(b[name], a[name], atol=rtol * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_gives_the_full_batch_gradient(model, accumulation):
    batch = uneven_batch()
    full, loss = gradient(model, batch)
    accumulated, accumulated_loss = gradient(model, batch, accumulation)
    assert accumulated_loss == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(full, accumulated)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sharded_step_matches_one_device(model, accumulation):
    batch = uneven_batch()
    single, _ = gradient(model, batch)
    sharded, _ = gradient(model, batch, accumulation, mesh=global_mesh(dp=2, fsdp=2))
    assert_same_gradients(single, sharded)


def test_eval_in_micro_batches_gives_the_whole_batch_sums(model):
    mesh = global_mesh(dp=2, fsdp=2)
    rows = batch_sharding(mesh)
    params = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in model.params.items()}
    batch = {k: jax.device_put(v, rows) for k, v in uneven_batch().items()}
    whole = make_eval_step(model.layout, loss_chunk_size=8)(params, batch)
    micro = make_eval_step(model.layout, 8, gradient_accumulation_steps=2, batch_sharding=rows)(params, batch)
    assert set(micro) == {"loss_sum", "correct", "weight_sum"}
    for key in micro:
        assert float(micro[key]) == pytest.approx(float(whole[key]), rel=1e-6), key


def _train(model_dir, steps=3, dtype=jnp.float32, mesh_dims=(1, 4, 1, 1), one_batch=False):
    """`steps` AdamW steps on a 4-device fsdp mesh (on one batch, or a new one each step);
    the final params on host."""
    from raysft.workers.runtime.mesh import optimizer_state_shardings
    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.loading import load_params
    from raysft.workers.models.runtime import ModelRuntime
    from raysft.workers.training.optimizer import build_optimizer
    from raysft.workers.spec import TrainSpec

    mesh = global_mesh(*mesh_dims)
    layout = build_layout(ModelConfig.from_file(model_dir / "config.json"), dtype, jnp.float32, ModelRuntime(mesh=mesh))
    p_shard = {n: param_sharding(mesh, n, s.shape) for n, s in layout.shapes.items()}
    params, _ = load_params(model_dir, layout, lambda n, shape: p_shard[n])
    spec = TrainSpec.from_config(rs.SFTConfig(learning_rate=1e-2), model="-")
    optimizer = build_optimizer(spec, steps)
    opt_shard = optimizer_state_shardings(jax.eval_shape(optimizer.init, params), params, p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shard)(params)
    step = make_train_step(layout, optimizer, (p_shard, opt_shard), batch_sharding=batch_sharding(mesh))
    losses = []
    for s in range(steps):
        params, opt_state, metrics = step(params, opt_state, uneven_batch(seed=0 if one_batch else s), {}, s)
        losses.append(float(metrics["loss"]))
    return {n: np.asarray(p) for n, p in params.items()}, losses


def test_same_seed_and_config_give_bit_identical_parameters(model):
    first, _ = _train(model.model_dir)
    second, _ = _train(model.model_dir)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_bfloat16_compute_with_float32_params_trains(model):
    # One batch throughout: random tokens leave little to learn across batches, and the
    # loss of a new batch may as well rise.
    params, losses = _train(model.model_dir, steps=4, dtype=jnp.bfloat16, one_batch=True)
    assert {p.dtype for p in params.values()} == {np.dtype(np.float32)}
    _, full = _train(model.model_dir, steps=4, one_batch=True)
    assert losses[-1] < losses[0] - 0.05
    # bf16 matmuls, fp32 master weights and fp32 loss: measured within 2e-4 of fp32.
    np.testing.assert_allclose(losses, full, rtol=2e-3)


def test_z_loss_gradient_matches_its_formula(model):
    """The step's gradient with z_loss against jax.grad of the formula written out on the
    full logits: mean over supervised targets of cross-entropy + z_loss * log(Z)^2."""
    batch, z = uneven_batch(seed=3), 0.1

    def reference(params):
        logits = model.layout.bind(params)(batch["input_ids"], batch["segment_ids"], batch["positions"])
        log_z = jax.nn.logsumexp(logits[:, :-1].astype(jnp.float32), axis=-1)
        targets = batch["input_ids"][:, 1:]
        target_logit = jnp.take_along_axis(logits[:, :-1], targets[..., None], axis=-1)[..., 0]
        weights = batch["loss_weights"][:, 1:]
        return jnp.sum(weights * (log_z - target_logit + z * log_z**2)) / jnp.sum(weights)

    expected = {n: np.asarray(g) for n, g in jax.jit(jax.grad(reference))(model.params).items()}
    with_z, _ = jax.jit(make_gradient_fn(model.layout, loss_chunk_size=8, z_loss=z))(model.params, batch)
    without, _ = gradient(model, batch)
    assert_same_gradients(expected, {n: np.asarray(g) for n, g in with_z.items()}, rtol=1e-5)
    assert max(np.abs(expected[n] - without[n]).max() / np.abs(expected[n]).max() for n in expected) > 1e-3


def test_flops_formula_against_the_compilers_count(tmp_path):
    """XLA's own FLOP count of the compiled training gradient (dense attention: it
    computes the masked half too) against the formula plus that half: matmuls dominate,
    the few percent over them are the elementwise ops (a missing LM head or a wrong
    attention factor would be 15-20% off)."""
    from raysft.workers.training.flops import flops_per_token

    model_dir = save_tiny_model(tmp_path, vocab_size=512, hidden_size=64, intermediate_size=256, head_dim=16,
                                max_position_embeddings=512)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir, attn_mechanism="vanilla")
    b, t = 2, 256
    batch = {"input_ids": jnp.zeros((b, t), jnp.int32), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), "loss_weights": jnp.ones((b, t))}
    compiled = jax.jit(make_gradient_fn(model.layout)).lower(model.params, batch).compile()
    cost = compiled.cost_analysis()
    counted = (cost[0] if isinstance(cost, list) else cost)["flops"] / (b * t)
    cfg = model.config
    masked_half = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t
    assert 1.0 <= counted / (flops_per_token(cfg, t) + masked_half) <= 1.1


def test_model_flops_count_each_documents_causal_pairs_by_hand():
    from types import SimpleNamespace

    from raysft.workers.training import flops
    from raysft.workers.models.config import ModelConfig

    segments = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [4] * 8], jnp.int32)
    # Documents of 2, 3, 1 and 8 tokens: 3 + 6 + 1 + 36 (query, key) pairs, padding none.
    assert float(flops.attention_pairs(segments)) == 46
    cfg = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16, "head_dim": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 32,
    })
    # Per layer q, k, v, o, gate, up, down: 8*4*2 + 2*8*2*2 + 4*2*8 + 3*8*16 = 576; x3 layers
    # + the LM head 8*32 = 1984 matmul parameters, 6 FLOPs each per token; 12*3*4*2 = 288 per pair.
    assert flops.model_flops(cfg, tokens=14, pairs=46) == 6 * 1984 * 14 + 288 * 46
    assert flops.flops_per_token(cfg, 8) == 6 * 1984 + 288 * 36 / 8  # one 8-token document per row
    # A layer with a window of 2 sees 1, 2, 2, ... keys: 3 + 5 + 1 + 15 pairs; two layers average.
    assert float(flops.attention_pairs(segments, (None, 2))) == (46 + 24) / 2
    # Windows of 3 in two of three layers: 8 tokens see 1 + 2 + 3 * 6 = 21 keys there, 36 in the other.
    windowed = dataclasses.replace(cfg, sliding_windows=(None, 3, 3))
    assert flops.flops_per_token(windowed, 8) == 6 * 1984 + 288 * (36 + 21 + 21) / 3 / 8

    # A CPU mesh's peak is its machine's, however many virtual devices it has.
    peak, source = flops.mesh_peak_flops(jax.devices())
    assert len(jax.devices()) == 4 and peak == flops._cpu_probe() and "x 1 machine" in source
    # fp32 on GPUs is TF32 tensor cores; TPUs run it as one bf16 pass.
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert flops.peak_flops(h100, "float32")[0] == 494.7e12 and flops.peak_flops(h100, "bfloat16")[0] == 989e12
    v5p = SimpleNamespace(device_kind="TPU v5p", platform="tpu")
    assert flops.peak_flops(v5p, "float32")[0] == flops.peak_flops(v5p, "bfloat16")[0] == 459e12


def test_tied_head_gradient_equals_autodiffs():
    """The tied head's own backward (the table's gradient computed [D, V] on CPU) against
    autodiff of the plain product it replaces."""
    from raysft.workers.models.runtime import _tied_logits

    query = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    table = jax.random.normal(jax.random.PRNGKey(1), (13, 8))

    def grads(logits_fn):
        return jax.grad(lambda q, e: jnp.sum(jnp.sin(logits_fn(q, e))), argnums=(0, 1))(query, table)

    for ours, plain in zip(grads(_tied_logits), grads(lambda q, e: jnp.dot(q, e.T))):
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)
