"""Our Flax decoder against transformers' PyTorch implementations (the reference), and the
Hugging Face export read back by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_model


def _reference_logits(model_dir, input_ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.from_numpy(input_ids)).logits.numpy()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
GEMMA3_ROPE = {  # transformers 5's per-layer-type form; the global layers scaled as Gemma 3 4B+
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 2_000.0},  # not the default 10,000
}


def _longrope(rotary_dim: int, head_dim: int = 8) -> dict:
    """Phi-3.5's LongRoPE on a model pre-trained on 32 positions, extended to 256."""
    rng = np.random.default_rng(rotary_dim)
    return {
        "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": rotary_dim / head_dim,
        "short_factor": list(1 + rng.random(rotary_dim // 2)), "long_factor": list(2 + 3 * rng.random(rotary_dim // 2)),
    }


LONGROPE_LENGTHS = {"max_position_embeddings": 256, "original_max_position_embeddings": 32}
# (architecture, config overrides): every switch the supported architectures have. The
# inputs are 48 long: longer than every window, and than LongRoPE's pre-training length.
VARIANTS = {
    "llama-untied-gqa2": ("llama", {}),
    "llama-tied-mqa": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "llama-mha-headdim16": ("llama", {"num_key_value_heads": 4, "head_dim": 16}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "mistral-no-window": ("mistral", {"sliding_window": None}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-window-from-layer-1": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3-headdim16": ("qwen3", {"head_dim": 16, "num_key_value_heads": 1}),
    "qwen3-bias-window": ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}),
    "gemma2-capped-tied": (
        "gemma2",
        {"sliding_window": 6, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
         "tie_word_embeddings": True},
    ),
    "gemma2-uncapped-untied": ("gemma2", {"sliding_window": 6, "attn_logit_softcapping": None, "final_logit_softcapping": None}),
    "gemma3-5to1-local-rope": (
        "gemma3", {"num_hidden_layers": 6, "sliding_window": 5, "rope_parameters": GEMMA3_ROPE, "head_dim": 16},
    ),
    "gemma3-global-final-cap": (  # transformers caps only Gemma 3's final logits, whatever the config says
        "gemma3",
        {"layer_types": ["full_attention"] * 2, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0,
         "tie_word_embeddings": True},
    ),
    "phi3-window": ("phi3", {"sliding_window": 7}),
    "phi4-mini-partial-rotary": (
        "phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75}},
    ),
    "phi35-longrope": ("phi3", {"rope_parameters": _longrope(8), **LONGROPE_LENGTHS}),
    "phi3-longrope-partial-tied": ("phi3", {"rope_parameters": _longrope(4), **LONGROPE_LENGTHS, "tie_word_embeddings": True}),
    "qwen3moe-renormalised-top2": ("qwen3_moe", {}),
    "qwen3moe-raw-top3-window": (
        "qwen3_moe", {"norm_topk_prob": False, "num_experts_per_tok": 3, "use_sliding_window": True, "sliding_window": 6},
    ),
    "mixtral-window": ("mixtral", {"sliding_window": 6}),
}


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, scan_layers):
    architecture, overrides = VARIANTS[variant]
    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture=architecture, **overrides)
    input_ids = np.random.default_rng(0).integers(0, 97, size=(2, 48)).astype(np.int64)

    model = rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=scan_layers)
    ours = np.asarray(model(input_ids))
    ref = _reference_logits(model_dir, input_ids)

    assert ours.shape == ref.shape == (2, 48, 97)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_longrope_switches_to_its_long_factors_past_the_pre_training_length(tmp_path):
    """Inputs of 48 (above) take the long factors; 20 positions stay within the 32
    pre-trained ones and take the short factors, as transformers chooses per batch."""
    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture="phi3", rope_parameters=_longrope(8), **LONGROPE_LENGTHS)
    input_ids = np.random.default_rng(0).integers(0, 97, size=(2, 20)).astype(np.int64)
    ours = np.asarray(rs.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids))
    np.testing.assert_allclose(ours, _reference_logits(model_dir, input_ids), atol=1e-4, rtol=0)


def test_rotate_half_in_bf16_is_exactly_the_swap_of_halves():
    """bf16 runs rotate by a product with a signed permutation (an MXU pass on TPU), fp32
    runs swap the halves: the same numbers, bit for bit, over bf16's whole range."""
    import jax
    import jax.numpy as jnp

    from raysft.workers.models.decoder import rotate_half

    x = (jax.random.normal(jax.random.key(0), (2, 3, 4, 64)) * jnp.logspace(-30, 30, 64)).astype(jnp.bfloat16)
    swapped = jnp.concatenate([-x[..., 32:], x[..., :32]], axis=-1)
    np.testing.assert_array_equal(np.asarray(rotate_half(x), np.float32), np.asarray(swapped, np.float32))
    np.testing.assert_array_equal(np.asarray(rotate_half(x.astype(jnp.float32))), np.asarray(swapped, np.float32))


@pytest.mark.parametrize(
    "variant",
    ["llama-untied-gqa2", "mistral-window", "qwen3-bias-window", "gemma2-capped-tied", "gemma3-5to1-local-rope", "phi3-window",
     "qwen3moe-raw-top3-window"],
)
def test_packed_segments_match_documents_run_alone(tmp_path, variant):
    architecture, overrides = VARIANTS[variant]
    model_dir = save_tiny_model(tmp_path, vocab_size=97, architecture=architecture, **overrides)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 97, size=n) for n in (7, 12, 5)]
    packed = np.concatenate(docs + [np.zeros(8, np.int64)])[None]
    segment_ids = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(8)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.arange(8)])[None]

    packed_logits = np.asarray(model(packed, segment_ids.astype(np.int32), positions.astype(np.int32)))
    start = 0
    for doc in docs:
        alone = np.asarray(model(doc[None]))
        np.testing.assert_allclose(packed_logits[0, start : start + len(doc)], alone[0], atol=1e-5)
        start += len(doc)


def test_unsupported_architecture_is_named(tmp_path):
    import json

    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, .*Gemma2ForCausalLM, .*Phi3ForCausalLM"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "setting, message",
    [({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn' is not supported"),
     ({"hidden_activation": "relu6"}, "hidden activation 'relu6' is not one of"),
     ({"use_bidirectional_attention": True}, "bidirectional Gemma")],
)
def test_a_setting_raysft_does_not_take_is_named_with_the_config_file(setting, message):
    from raysft.workers.models.config import ModelConfig

    hf = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
          "num_hidden_layers": 2, "num_attention_heads": 2, **setting}
    with pytest.raises(ValueError, match=f"^models/g/config.json: {message}"):
        ModelConfig.from_hf_dict(hf, source="models/g/config.json")


def test_missing_model_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=f"model directory not found: {missing}"):
        rs.AutoModelForCausalLM.from_pretrained(missing)


def test_model_directory_without_weights_names_the_path(tmp_path):
    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"no model.safetensors .* in model directory {model_dir}"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)


def test_model_directory_without_config_names_the_path(tmp_path):
    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    (model_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=f"^model directory {model_dir} has no config.json$"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "variant, dtype",
    [("qwen3-headdim16", "float32"), ("qwen3-headdim16", "bfloat16"), ("gemma3-5to1-local-rope", "float32"),
     ("phi35-longrope", "float32"), ("mixtral-window", "float32")],
)
def test_export_round_trip_loads_in_transformers(tmp_path, monkeypatch, variant, dtype):
    """Sharded files that transformers loads with the same logits; Phi-3's projections
    fused again and Mixtral's experts split again exactly as the source held them."""
    import json

    from safetensors.numpy import load_file

    from raysft.workers.models import export

    architecture, overrides = VARIANTS[variant]
    source = save_tiny_model(tmp_path / "source", vocab_size=97, architecture=architecture, **overrides)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "max_new_tokens": 7}))
    monkeypatch.setattr(export, "SHARD_BYTES", 20_000)  # force several files and an index
    model = rs.AutoModelForCausalLM.from_pretrained(source, scan_layers=True)
    out = tmp_path / "exported"
    model.save_pretrained(out, dtype=dtype)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype

    input_ids = np.random.default_rng(3).integers(0, 97, size=(2, 40)).astype(np.int64)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    stored = {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()}
    assert stored == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}
    with torch.no_grad():
        theirs = ref(torch.from_numpy(input_ids)).logits.numpy()
    # fp32 export is lossless; bf16 rounds the weights, so compare against the rounded model.
    ours = np.asarray(model(input_ids)) if dtype == "float32" else np.asarray(rs.AutoModelForCausalLM.from_pretrained(out)(input_ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    if dtype == "float32":  # lossless: the very tensors the source holds, under its names
        read = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
        written, original = read(out), read(source)
        assert sorted(written) == sorted(original)
        for key in original:
            np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def test_bfloat16_params_and_compute_track_float32(tmp_path):
    import jax.numpy as jnp

    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    input_ids = np.random.default_rng(4).integers(0, 97, size=(2, 32))
    full = np.asarray(rs.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids))
    half = rs.AutoModelForCausalLM.from_pretrained(model_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {p.dtype for p in half.params.values()} == {jnp.dtype(jnp.bfloat16)}
    logits = half(input_ids)
    assert logits.dtype == jnp.bfloat16
    # bf16 keeps 8 bits of mantissa (a relative step of 2^-8); weights, activations and
    # logits each rounded: within 4 such steps of the logits' scale (measured: about 1.6).
    error = np.abs(np.asarray(logits, np.float32) - full).max()
    assert error <= 2**-6 * np.abs(full).max(), error


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scanned"])
def test_fused_checkpoint_loads_and_exports_sharded_over_fsdp_and_tp(tmp_path, scan_layers):
    """Phi-3 on a 2 x 2 fsdp/tp mesh: each device reads its slice of q, k, v (or gate,
    up) out of the fused tensors, and the export gathers and fuses them again into the
    very tensors the checkpoint holds."""
    from etils import epath
    from safetensors.numpy import load_file

    from raysft.workers.runtime.mesh import global_mesh
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.models.export import save_pretrained
    from raysft.workers.models.loading import load_params

    architecture, overrides = VARIANTS["phi3-window"]
    model_dir = save_tiny_model(tmp_path / "source", vocab_size=96, architecture=architecture, **overrides)
    model = rs.AutoModelForCausalLM.from_pretrained(model_dir, scan_layers=scan_layers)
    mesh = global_mesh(1, 2, 2, 1)
    sharded, _ = load_params(model_dir, model.layout, lambda name, shape: param_sharding(mesh, name, shape))
    kernel = next(n for n in sharded if n.endswith("k_proj.kernel"))
    assert len(sharded[kernel].sharding.device_set) == 4
    for name, value in model.params.items():
        np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(value), err_msg=name)

    import json

    save_pretrained(sharded, json.loads((model_dir / "config.json").read_text()), epath.Path(tmp_path / "out"))
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert sorted(written) == sorted(original) and any("qkv_proj" in key for key in written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)
