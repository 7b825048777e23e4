"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers: the load-balancing
loss and one step's gradients, dense layers mixed in, both checkpoint layouts, expert
parallelism against one device, the grouped matmul against `ragged_dot`, and FLOPs that
count the experts a token uses. (Logits, packed rows, export and greedy decoding are in
test_model_parity and test_generation with the other families.)"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.runtime.mesh import ShardingError, batch_sharding, global_mesh
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelLoadError
from raysft.workers.models.partition import param_sharding
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.training.step import RouterWeights, batch_sums, make_gradient_fn

VOCAB = 96


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def source(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), VOCAB, request.param)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return rs.AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("qwen3_moe"), VOCAB, "qwen3_moe"))


def padded_batch(rows=4, t=16, seed=0):
    """Rows of real tokens then padding (segment 0), every real token supervised."""
    rng = np.random.default_rng(seed)
    real = np.ones((rows, t), np.int32)
    for r, length in enumerate(rng.integers(t // 2, t + 1, rows)):
        real[r, length:] = 0
    return {
        "input_ids": jnp.asarray(rng.integers(3, VOCAB, (rows, t)), jnp.int32),
        "segment_ids": jnp.asarray(real),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t)),
        "loss_weights": jnp.asarray(real, jnp.float32),
    }


def _to_ours(name: str, grad: np.ndarray) -> tuple[str, np.ndarray]:
    """transformers 5's parameter and its gradient under raysft's name and layout."""
    if name.endswith("embed_tokens.weight"):
        return name[: -len(".weight")] + ".embedding", grad
    if name.endswith(".weight") and grad.ndim == 2:
        return name[: -len(".weight")] + ".kernel", grad.T
    if ".experts." in name:  # [E, out, in] (gate_up fused) -> ours [E, in, out]
        return name + ".kernel", grad.transpose(0, 2, 1)
    return name, grad


def test_aux_loss_and_one_steps_gradients_match_transformers(source):
    """transformers' `aux_loss` (output_router_logits, padding masked out) and the gradient
    of its loss, cross-entropy + router_aux_loss_coef * aux_loss, parameter by parameter."""
    from transformers import AutoModelForCausalLM

    batch = padded_batch()
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids, real = (torch.tensor(np.asarray(batch[k])).long() for k in ("input_ids", "segment_ids"))
    out = ref(ids, attention_mask=real, labels=torch.where(real > 0, ids, -100), output_router_logits=True)
    out.loss.backward()

    model = rs.AutoModelForCausalLM.from_pretrained(source)
    coef = ref.config.router_aux_loss_coef
    grads, sums = jax.jit(make_gradient_fn(model.layout, router=(coef, 0.0)))(model.params, batch)
    assert float(sums["aux_loss"]) == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert float(sums["loss_sum"] / sums["weight_sum"]) == pytest.approx(out.loss.item() - coef * out.aux_loss.item(), rel=1e-5)

    theirs = {}
    for name, param in ref.named_parameters():
        ours, grad = _to_ours(name, param.grad.numpy())
        if name.endswith("experts.gate_up_proj"):
            f = grad.shape[-1] // 2
            theirs[ours.replace("gate_up_proj", "gate_proj")], theirs[ours.replace("gate_up_proj", "up_proj")] = (
                grad[..., :f], grad[..., f:])
        else:
            theirs[ours] = grad
    assert sorted(theirs) == sorted(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(np.asarray(grad), theirs[name], atol=1e-4 * np.abs(theirs[name]).max(), rtol=0,
                                   err_msg=name)


def test_router_z_loss_and_expert_load_follow_their_formulas(tmp_path):
    """z-loss: mean over layers and real tokens of logsumexp(router logits)^2, its gradient
    weighted in; expert load: each layer's assignments per expert, padding excluded."""
    from transformers import AutoModelForCausalLM

    source = save_tiny_model(tmp_path, VOCAB, "mixtral")
    batch = padded_batch(seed=1)
    ref = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    real = np.asarray(batch["segment_ids"]).reshape(-1) > 0
    with torch.no_grad():
        out = ref(torch.tensor(np.asarray(batch["input_ids"])).long(), output_router_logits=True)
    logits = [layer.numpy()[real] for layer in out.router_logits]
    z = np.mean([np.square(np.log(np.exp(x).sum(-1))) for x in logits])
    top = [np.argsort(-x, axis=-1)[:, : ref.config.num_experts_per_tok] for x in logits]
    assigned = np.stack([np.bincount(t.reshape(-1), minlength=x.shape[-1]) for t, x in zip(top, logits)])

    model = rs.AutoModelForCausalLM.from_pretrained(source)
    sums = batch_sums(model.layout, model.params, batch)
    assert float(sums["router_z_loss"]) == pytest.approx(z, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(sums["expert_assigned"]), assigned)

    def objective(params, z_weight):
        return batch_sums(model.layout, params, batch, router=RouterWeights(0.0, z_weight, 7.0))["objective"]

    # What z-loss adds to the objective's gradient: its weight x scale x its own gradient.
    added = jax.jit(jax.grad(lambda params: objective(params, 0.5) - objective(params, 0.0)))(model.params)
    z_only = jax.jit(jax.grad(lambda params: _z(params, model, batch)))(model.params)
    for name in added:
        np.testing.assert_allclose(np.asarray(added[name]), 3.5 * np.asarray(z_only[name]),
                                   atol=1e-5 * (np.abs(np.asarray(z_only[name])).max() + 1e-9), err_msg=name)


def _z(params, model, batch):
    """The router z-loss with its gradient (batch_sums reports it without one)."""
    from raysft.workers.training.router_loss import router_terms

    _, routing = model.layout.bind(params).hidden_states_and_routing(
        batch["input_ids"], batch["segment_ids"], batch["positions"]
    )
    return router_terms(routing)["router_z_loss"]


@pytest.mark.parametrize(("dims", "split"), [((1, 4, 1, 1), True), ((2, 2, 1, 1), True), ((1, 2, 1, 2), True),
                                             ((2, 1, 2, 1), True), ((1, 2, 2, 1), False)],
                         ids=["ep4", "dp2-ep2", "ep2-sp2", "dp2-tp2-no-ep", "fsdp2-tp2-gathered"])
def test_expert_parallel_meshes_equal_one_device(qwen3_moe, dims, split):
    """Experts split over fsdp (and sp), tokens sent to their experts' devices and back
    (an all-to-all each way), or every expert on every device with tp splitting them, or
    (`moe_expert_parallel` false) stored split over fsdp and gathered for each device's own
    tokens: the loss, routing terms and gradients of one device. (Experts split over fsdp
    and tp together: the LoRA test below.)"""
    model = qwen3_moe
    batch = padded_batch(rows=4, t=16, seed=2)
    gradient = make_gradient_fn(model.layout, router=(0.01, 0.001))
    single, single_sums = jax.jit(gradient)(model.params, batch)

    mesh = global_mesh(*dims)
    layout = build_layout(model.config, jnp.float32, jnp.float32, ModelRuntime(mesh=mesh, moe_expert_parallel=split))
    params = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in model.params.items()}
    experts = next(n for n in params if n.endswith("experts.down_proj.kernel"))
    assert params[experts].sharding.shard_shape(params[experts].shape)[0] == 4 // (dims[1] * dims[3])
    rows = batch_sharding(mesh)
    grads, sums = jax.jit(make_gradient_fn(layout, batch_sharding=rows, router=(0.01, 0.001)))(
        params, jax.device_put(batch, rows)
    )
    for key in ("loss_sum", "aux_loss", "router_z_loss", "expert_assigned"):
        np.testing.assert_allclose(np.asarray(sums[key]), np.asarray(single_sums[key]), rtol=1e-5, err_msg=key)
    for name in single:
        expected = np.asarray(single[name])
        np.testing.assert_allclose(np.asarray(grads[name]), expected, atol=1e-5 * np.abs(expected).max(), rtol=0,
                                   err_msg=name)


def test_experts_that_do_not_split_over_the_mesh_are_named(tmp_path):
    model_dir = save_tiny_model(tmp_path, VOCAB, "mixtral", num_local_experts=6)
    mesh = global_mesh(1, 4, 1, 1)
    with pytest.raises(ShardingError, match=r"experts\.(gate|up|down)_proj\.kernel .*dimension 6 is not divisible by mesh fsdp=4"):
        model = rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=True)
        for name, abstract in model.layout.shapes.items():
            param_sharding(mesh, name, abstract.shape)


def test_dense_layers_mixed_in_match_transformers_and_scanning_them_is_refused(tmp_path):
    """Qwen3-MoE's `mlp_only_layers` and `decoder_sparse_step` keep some layers dense."""
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path, VOCAB, "qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0],
                                decoder_sparse_step=2)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.sparse_per_layer == (False, True, False, True)
    ids = np.random.default_rng(5).integers(3, VOCAB, (2, 24))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)
    sums = batch_sums(model.layout, model.params, padded_batch())
    assert sums["expert_assigned"].shape == (2, 4)  # the two sparse layers only
    with pytest.raises(ValueError, match="mixes dense layers with mixture-of-experts layers.*scan_layers false"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=True)


def test_transformers_fused_expert_tensors_load(source, tmp_path):
    """A checkpoint holding transformers 5's in-memory layout (`mlp.experts.gate_up_proj`
    [E, 2F, D], `mlp.router` under `mlp.gate`) loads to the same model as the published one."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(source / "config.json", fused / "config.json")
    state = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors", metadata={"format": "pt"})
    published = rs.AutoModelForCausalLM.from_pretrained(source, scan_layers=True).params
    loaded = rs.AutoModelForCausalLM.from_pretrained(fused, scan_layers=True).params
    for name, value in published.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), np.asarray(value), err_msg=name)


def test_a_missing_expert_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = save_tiny_model(tmp_path, VOCAB, "mixtral")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight' missing"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir).params


@pytest.mark.parametrize("sizes", [(5, 0, 9, 2), (0, 0, 16, 0), (1, 1, 1, 1)])
def test_grouped_matmul_on_cpu_equals_ragged_dot(sizes):
    """The CPU's tiled grouped matmul against `lax.ragged_dot` (empty groups, one group
    taking everything, rows past the groups' total), values and gradients."""
    from raysft.workers.models.experts import grouped_matmul

    rng = np.random.default_rng(sum(sizes))
    x = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    ours = lambda x, w: grouped_matmul(x, w, group_sizes, "cpu")  # noqa: E731
    reference = lambda x, w: jax.lax.ragged_dot(x, w, group_sizes)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), reference(x, w), atol=1e-5)
    cotangent = jnp.asarray(rng.normal(size=(20, 5)), jnp.float32)
    grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1))(x, w)  # noqa: E731
    for a, b in zip(grad(ours), grad(reference)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_flops_count_the_experts_a_token_uses():
    from raysft.workers.training import flops
    from raysft.workers.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8, "intermediate_size": 16, "moe_intermediate_size": 4,
        "head_dim": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32,
        "num_experts": 16, "num_experts_per_tok": 3, "mlp_only_layers": [1],
    })
    # Attention 8*4*2 + 2*8*2*2 + 4*2*8 = 192 per layer; layer 0: the router 8*16 and 3 of
    # 16 experts 3*8*4 each; layer 1 dense 3*8*16; the LM head 8*32.
    active = 2 * 192 + (8 * 16 + 3 * 3 * 8 * 4) + 3 * 8 * 16 + 8 * 32
    assert flops.matmul_flops_per_token(cfg) == 6 * active
    assert json.dumps(cfg.sparse_per_layer) == "[true, false]"


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora-int8"])
def test_lora_on_experts_is_what_the_merged_export_computes(tmp_path, quantized):
    """Each expert's own adapters (and, under QLoRA, its quantized base) through the
    grouped matmuls equal transformers on the merged export; on an expert-parallel mesh
    with tp their gradients equal one device's (down_proj's A splits over tp)."""
    from etils import epath
    from transformers import AutoModelForCausalLM

    from raysft.workers.models.config import read_hf_config
    from raysft.workers.models.export import save_pretrained
    from raysft.workers.models.lora import LoraSettings, is_adapter, resolve_modules
    from raysft.workers.models.quantization import Quantization
    from test_qlora import _load

    model_dir = save_tiny_model(tmp_path / "base", VOCAB, "qwen3_moe")
    hf = read_hf_config(model_dir / "config.json")
    cfg = rs.AutoModelForCausalLM.from_pretrained(model_dir).config
    modules = resolve_modules(["q_proj", "experts"], cfg)
    assert modules == ("q_proj", "experts.gate_proj", "experts.up_proj", "experts.down_proj")
    assert resolve_modules("all-linear", cfg) == ("q_proj", "k_proj", "v_proj", "o_proj")
    lora = LoraSettings(4, 8.0, 0.0, modules, Quantization("int8", 16) if quantized else None)
    layout, params = _load(model_dir, lora, scan_layers=True)
    assert params["model.layers.mlp.experts.down_proj.lora_a"].shape == (2, 4, 16, 4)  # [L, E, F, r]
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, 24))
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))
    save_pretrained(params, hf, epath.Path(tmp_path / "merged"), lora_scale=lora.scale)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)
    if quantized:
        return

    adapters = {n: p for n, p in params.items() if is_adapter(n)}
    frozen = {n: p for n, p in params.items() if n not in adapters}
    batch = padded_batch(seed=3)
    single, _ = jax.jit(make_gradient_fn(layout))(adapters, batch, frozen)
    mesh = global_mesh(1, 2, 2, 1)
    sharded_layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime(scan_layers=True, mesh=mesh), lora)
    place = lambda tree: {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in tree.items()}  # noqa: E731
    rows = batch_sharding(mesh)
    grads, _ = jax.jit(make_gradient_fn(sharded_layout, batch_sharding=rows))(
        place(adapters), jax.device_put(batch, rows), place(frozen)
    )
    for name in single:
        expected = np.asarray(single[name])
        np.testing.assert_allclose(np.asarray(grads[name]), expected, atol=1e-5 * np.abs(expected).max(), rtol=0,
                                   err_msg=name)


def test_expert_adapters_round_trip_through_peft(tmp_path):
    """PEFT adapts transformers 5's expert tensors as parameters (`target_parameters`):
    an adapter PEFT trained (one A for gate and up) reads into raysft's per-projection
    adapters with PEFT's logits, and raysft's adapter, written back in PEFT's layout,
    loads in PEFT with raysft's logits."""
    from etils import epath
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from raysft.workers.models.lora import LoraSettings, is_adapter, resolve_modules
    from raysft.workers.models.peft import save_adapter
    from test_lora import _ours

    model_dir = save_tiny_model(tmp_path / "base", VOCAB, "mixtral")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(0).integers(3, VOCAB, size=(2, 20))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()

    cfg = rs.AutoModelForCausalLM.from_pretrained(model_dir).config
    lora = LoraSettings(4, 8.0, 0.0, resolve_modules(["q_proj", "v_proj", "experts"], cfg))
    _, layout, params = _ours(model_dir, lora, tmp_path / "peft", scan_layers=True)
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    # Trained apart, gate's and up's adapters differ: written as one of rank 2r.
    params = {n: p * 1.5 if n.endswith("experts.up_proj.lora_b") else p for n, p in params.items()}
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))
    save_adapter({n: p for n, p in params.items() if is_adapter(n)}, lora, epath.Path(tmp_path / "ours"), str(model_dir), cfg)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    gate_up = "mlp.experts.gate_up_proj"
    assert (written["rank_pattern"], written["alpha_pattern"]) == ({gate_up: 8}, {gate_up: 16.0})
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)
    # And raysft reads its own adapter back (lora_init_from).
    _, _, again = _ours(model_dir, lora, tmp_path / "ours", scan_layers=True)
    np.testing.assert_allclose(np.asarray(layout.bind(again)(jnp.asarray(ids))), ours, atol=1e-5, rtol=0)


def test_a_capacity_factor_drops_only_the_overflow(qwen3_moe):
    """With room for every assignment it computes what dropless routing does (also split
    over an expert-parallel mesh, buffers exchanged with all-to-all); with less, each
    expert keeps its first C real tokens' assignments and the step counts the rest."""
    model, batch = qwen3_moe, padded_batch(seed=4)
    cfg = model.config

    def sums_with(factor, mesh=None):
        runtime = ModelRuntime(mesh=mesh, moe_capacity_factor=factor)
        layout = build_layout(cfg, jnp.float32, jnp.float32, runtime)
        params, rows = model.params, batch
        if mesh is not None:
            params = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in params.items()}
            rows = jax.device_put(batch, batch_sharding(mesh))
        return jax.jit(lambda p, b: batch_sums(layout, p, b))(params, rows)

    dropless, roomy = batch_sums(model.layout, model.params, batch), sums_with(2.0)  # C = N k / E x 2 = N
    assert float(roomy["expert_dropped"]) == 0
    np.testing.assert_allclose(float(roomy["loss_sum"]), float(dropless["loss_sum"]), rtol=1e-6)
    split = sums_with(2.0, global_mesh(1, 4, 1, 1))
    np.testing.assert_allclose(float(split["loss_sum"]), float(dropless["loss_sum"]), rtol=1e-5)

    tight = sums_with(0.5)
    n = batch["input_ids"].size
    capacity = -(-int(0.5 * n * cfg.num_experts_per_tok) // cfg.num_experts)
    # Real tokens take slots first, so each expert drops what it was given past C.
    expected = np.maximum(np.asarray(tight["expert_assigned"]) - capacity, 0).sum()
    assert float(tight["expert_dropped"]) == expected > 0
    assert float(tight["expert_assignments"]) == np.asarray(dropless["expert_assigned"]).sum()
