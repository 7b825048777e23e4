"""Remat policies, scanned layers, chunked cross-entropy and z-loss change how the model
computes, never what: each is checked against the plain computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.training.loss import token_loss_sums
from raysft.workers.runtime.mesh import global_mesh
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig
from raysft.workers.models.fused import fused_rows
from raysft.workers.models.llama import LlamaForCausalLM
from raysft.workers.models.params import ParamLayout, hf_tensors
from raysft.workers.models.partition import param_sharding
from raysft.workers.models.runtime import REMAT_POLICIES, ModelRuntime
from raysft.workers.training.step import batch_sums


def _batch(vocab=97, b=2, t=48, seed=0):
    rng = np.random.default_rng(seed)
    segment_ids = np.concatenate([np.full((b, 30), 1), np.full((b, t - 30), 2)], axis=1)
    positions = np.concatenate([np.arange(30), np.arange(t - 30)])[None].repeat(b, 0)
    weights = rng.random((b, t)) < 0.6  # a loss mask with holes, as chat masks have
    return {
        "input_ids": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
        "segment_ids": jnp.asarray(segment_ids, jnp.int32),
        "positions": jnp.asarray(positions, jnp.int32),
        "loss_weights": jnp.asarray(weights, jnp.float32),
    }


def _loss_and_grads(layout, params, batch, chunk=None):
    def loss(params):
        sums = batch_sums(layout, params, batch, chunk)
        return sums["objective"] / sums["weight_sum"]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    # Qwen2 with windows from layer 1 on: scanned layers must carry per-layer windows.
    out = tmp_path_factory.mktemp("qwen2")
    return save_tiny_model(
        out, vocab_size=97, architecture="qwen2", num_hidden_layers=3,
        use_sliding_window=True, sliding_window=6, max_window_layers=1,
    )


def test_remat_policies_and_scan_give_the_same_loss_and_gradients(qwen2_dir):
    batch = _batch()
    base = rs.AutoModelForCausalLM.from_pretrained(qwen2_dir)
    ref_loss, ref_grads = _loss_and_grads(base.layout, base.params, batch)
    scanned = rs.AutoModelForCausalLM.from_pretrained(qwen2_dir, scan_layers=True)
    for scan, params in ((False, base.params), (True, scanned.params)):
        for policy in REMAT_POLICIES:
            layout = build_layout(base.config, jnp.float32, jnp.float32, ModelRuntime("vanilla", policy, scan))
            loss, grads = _loss_and_grads(layout, params, batch)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
            layer0_q = grads["model.layers.self_attn.q_proj.kernel"][0] if scan else grads["model.layers.0.self_attn.q_proj.kernel"]
            np.testing.assert_allclose(layer0_q, ref_grads["model.layers.0.self_attn.q_proj.kernel"], atol=1e-6)
            np.testing.assert_allclose(grads["lm_head.kernel"], ref_grads["lm_head.kernel"], atol=1e-6)


def test_scanned_program_does_not_grow_with_depth(qwen2_dir):
    def hlo_chars(layers, scan):
        cfg = ModelConfig.from_file(qwen2_dir / "config.json")
        cfg = ModelConfig(**{**cfg.__dict__, "num_hidden_layers": layers, "sliding_windows": ()})
        layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime("vanilla", "full", scan))
        params = {n: jnp.zeros(s.shape, s.dtype) for n, s in layout.shapes.items()}
        grad = jax.jit(jax.grad(lambda p: batch_sums(layout, p, _batch())["objective"]))
        return len(grad.lower(params).as_text())

    assert hlo_chars(16, scan=True) < 1.2 * hlo_chars(2, scan=True)
    assert hlo_chars(16, scan=False) > 4 * hlo_chars(2, scan=False)


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
@pytest.mark.parametrize("chunk", [16, 7, 48, None], ids=["divides", "ragged", "whole", "unchunked"])
def test_chunked_cross_entropy_matches_autodiff_on_full_logits(tmp_path, chunk, tied):
    """The loss computes its own gradient chunk by chunk; autodiff of the formula written
    out on the whole [B, T, V] logits is the reference (the head's gradient included)."""
    model = rs.AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, vocab_size=97, tie_word_embeddings=tied))
    batch = _batch()

    def reference(params):
        logits = model.layout.bind(params)(batch["input_ids"], batch["segment_ids"], batch["positions"])[:, :-1]
        target_logit = jnp.take_along_axis(logits, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
        weights = batch["loss_weights"][:, 1:]
        return jnp.sum(weights * (jax.nn.logsumexp(logits, axis=-1) - target_logit)) / jnp.sum(weights)

    loss, grads = jax.jit(jax.value_and_grad(reference))(model.params)
    chunked_loss, chunked_grads = _loss_and_grads(model.layout, model.params, batch, chunk=chunk)
    np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
    assert ("lm_head.kernel" in grads) != tied
    for name in grads:
        np.testing.assert_allclose(chunked_grads[name], grads[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "architecture, overrides",
    [("gemma2", {"sliding_window": 6, "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0}),
     ("phi3", {"sliding_window": 7, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})],
    ids=["gemma2-capped", "phi3-partial-rotary"],
)
def test_training_gradients_match_transformers_backward(tmp_path, architecture, overrides):
    """One batch's loss and every parameter's gradient (scanned, chunked loss) against
    transformers' backward pass on the same weights: the soft caps, (1 + w) norms and
    partial rotary differentiate as torch differentiates them."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture=architecture, **overrides)
    ours = rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=True)
    batch = _batch()
    batch["segment_ids"], batch["positions"] = jnp.ones_like(batch["segment_ids"]), jnp.broadcast_to(jnp.arange(48), (2, 48))
    loss, grads = _loss_and_grads(ours.layout, ours.params, batch, chunk=16)

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    logits = ref(torch.from_numpy(np.asarray(batch["input_ids"])).long()).logits[:, :-1]
    targets = torch.from_numpy(np.asarray(batch["input_ids"])[:, 1:]).long()
    weights = torch.from_numpy(np.asarray(batch["loss_weights"])[:, 1:])
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), reduction="none")
    ref_loss = (token_loss * weights.reshape(-1)).sum() / weights.sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    ref_grads = {name: p.grad.numpy() for name, p in ref.named_parameters()}
    fused = fused_rows(ours.config)  # Phi-3: q/k/v and gate/up are rows of one fused tensor
    compared = set()
    for name, grad in grads.items():
        pieces = hf_tensors(name, grad.shape)
        for layer, (key, transposed) in enumerate(pieces):
            ours_grad = np.asarray(grad[layer] if len(pieces) > 1 else grad)
            ours_grad = ours_grad.T if transposed else ours_grad
            if key in fused:
                fused_key, start, stop = fused[key]
                ref_grad, key = ref_grads[fused_key][start:stop], fused_key
            else:
                ref_grad = ref_grads[key]
            np.testing.assert_allclose(ours_grad, ref_grad, atol=2e-5, err_msg=key)
            compared.add(key)
    tied_head = {"lm_head.weight"} if ours.config.tie_word_embeddings else set()  # the embedding's gradient
    assert compared == set(ref_grads) - tied_head


def test_loss_sums_against_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 9, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 9))
    weights = (rng.random((2, 9)) < 0.7).astype(np.float32)
    sums = token_loss_sums(jnp.asarray(logits), lambda h: h, jnp.asarray(ids), jnp.asarray(weights), chunk_size=4)

    log_z = np.log(np.exp(logits[:, :-1]).sum(-1))
    target = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0]
    w = weights[:, 1:]
    np.testing.assert_allclose(sums["loss_sum"], ((log_z - target) * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["z_sum"], (log_z**2 * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["correct"], ((logits[:, :-1].argmax(-1) == ids[:, 1:]) * w).sum())
    assert float(sums["weight_sum"]) == w.sum()

    # The objective's gradient, (softmax - one-hot(target)) * weight per position, plus
    # the z-loss term 2 z log Z softmax * weight; the reported sums carry none.
    z = 0.1
    objective = lambda x: token_loss_sums(x, lambda h: h, jnp.asarray(ids), jnp.asarray(weights), 4, z_loss=z)  # noqa: E731
    grad = np.asarray(jax.grad(lambda x: objective(x)["objective"])(jnp.asarray(logits)))
    softmax = np.exp(logits[:, :-1] - log_z[..., None])
    one_hot = np.eye(11)[ids[:, 1:]]
    expected = (softmax - one_hot + 2 * z * log_z[..., None] * softmax) * w[..., None]
    np.testing.assert_allclose(grad[:, :-1], expected, atol=1e-6)
    assert not grad[:, -1].any()
    assert not np.asarray(jax.grad(lambda x: objective(x)["loss_sum"])(jnp.asarray(logits))).any()


def test_chunked_cross_entropy_never_holds_all_logits():
    cfg = ModelConfig(
        vocab_size=16384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=True,
    )
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    batch = _batch(vocab=16384, b=4, t=256)
    logits_bytes = 4 * 256 * 16384 * 4

    def temp_bytes(chunk):
        grad = jax.jit(jax.grad(lambda p: batch_sums(layout, p, batch, chunk)["objective"]))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(None) >= logits_bytes
    # A 16-position chunk's logits, their softmax and gradient: a fraction of the full logits.
    assert temp_bytes(16) < logits_bytes / 2


def test_splash_on_a_sharded_mesh_matches_vanilla(tmp_path):
    model_dir = save_tiny_model(tmp_path, vocab_size=96, num_key_value_heads=2)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    mesh = global_mesh(dp=1, fsdp=2, tp=2)
    plain = rs.AutoModelForCausalLM.from_pretrained(model_dir, attn_mechanism="vanilla")
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime("splash", mesh=mesh))
    params = {n: jax.device_put(p, param_sharding(mesh, n, p.shape)) for n, p in plain.params.items()}
    batch = _batch(vocab=96, t=128, b=2)
    rows = NamedSharding(mesh, P(("dp", "fsdp")))
    args = [jax.device_put(batch[k], rows) for k in ("input_ids", "segment_ids", "positions")]
    sharded = jax.jit(lambda p, *a: layout.bind(p)(*a))(params, *args)
    np.testing.assert_allclose(sharded, plain(*[batch[k] for k in ("input_ids", "segment_ids", "positions")]), atol=1e-5)
