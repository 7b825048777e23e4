"""QLoRA: the frozen base held as int8 or nf4 block codes. The codes against a brute-force
reference in bitsandbytes' block layout, and the quantized model against transformers
reading its export. A run through `SFTTrainer` on two hosts: `test_freezing.py`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_model
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig, read_hf_config
from raysft.workers.models.export import save_pretrained
from raysft.workers.models.loading import load_params, load_quantized
from raysft.workers.models.lora import LoraSettings, initial_adapters, is_adapter
from raysft.workers.models.quantization import (
    NF4_LEVELS, Quantization, dequantize, is_codes, is_scale, quantize, quantized_part,
)
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.training.trainable import FreezingError

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _brute_force(torch_weight: np.ndarray, kind: str, block: int) -> np.ndarray:
    """bitsandbytes' blockwise quantization of a torch Linear weight [out, in], dequantized:
    the weight flattened row-major in blocks of `block`, each scaled by its absmax and
    rounded to the nearest level."""
    flat = torch_weight.astype(np.float64).reshape(-1, block)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    unit = flat / np.where(absmax == 0, 1, absmax)
    if kind == "int8":
        values = np.round(unit * 127) / 127
    else:
        values = NF4_LEVELS[np.abs(unit[..., None] - NF4_LEVELS).argmin(axis=-1)]
    return (values * absmax).reshape(torch_weight.shape)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_block_codes_match_a_brute_force_reference(kind):
    rng = np.random.default_rng(0)
    torch_weight = rng.normal(size=(48, 128)).astype(np.float32)  # [out, in]
    torch_weight[5, 64:] = 0  # a block of zeros stays zero
    q = Quantization(kind, 64)
    codes, scales = quantize(jnp.asarray(torch_weight.T), q)
    assert codes.dtype == (jnp.int8 if kind == "int8" else jnp.uint4)
    assert scales.shape == (2, 48)
    ours = np.asarray(dequantize(codes, scales, q)).T
    np.testing.assert_allclose(ours, _brute_force(torch_weight, kind, 64), atol=1e-6, rtol=0)
    assert not ours[5, 64:].any()
    assert Quantization.of(codes, scales) == q
    # A scanned layer stack is quantized per layer as the same kernels one by one.
    stacked = jnp.stack([jnp.asarray(torch_weight.T)] * 3)
    stacked_codes, stacked_scales = quantize(stacked, q)
    np.testing.assert_array_equal(np.asarray(stacked_codes[2]), np.asarray(codes))
    np.testing.assert_array_equal(np.asarray(stacked_scales[1]), np.asarray(scales))


def _load(model_dir, lora: LoraSettings, scan_layers: bool, seed: int = 1):
    """(layout, params): the base from `model_dir` (quantized where `lora` says), adapters
    with random non-zero B, so they change the logits."""
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime(scan_layers=scan_layers), lora)
    shapes = layout.shapes
    quantized = quantized_part(shapes)
    plain = {n: s for n, s in shapes.items() if n not in quantized and not is_adapter(n)}
    params, _ = load_params(model_dir, dataclasses.replace(layout, shapes=plain), lambda name, shape: DEVICE)
    if quantized:
        params.update(load_quantized(model_dir, quantized, lora.quantization, jnp.float32, lambda name, shape: DEVICE)[0])
    adapters = initial_adapters({n: s for n, s in shapes.items() if is_adapter(n)}, seed)
    key = jax.random.PRNGKey(seed)
    for name in adapters:
        if name.endswith(".lora_b"):
            key, sub = jax.random.split(key)
            adapters[name] = 0.05 * jax.random.normal(sub, adapters[name].shape)
    return layout, {**params, **adapters}


def _loss(layout, params, ids) -> float:
    logits = layout.bind(params)(jnp.asarray(ids[:, :-1]))
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return float(-jnp.take_along_axis(log_probs, jnp.asarray(ids[:, 1:, None]), axis=-1).mean())


@pytest.mark.parametrize(
    "kind, scan_layers, architecture", [("int8", False, "qwen2"), ("nf4", True, "qwen2"), ("int8", True, "phi3")]
)
def test_quantized_model_is_what_its_export_computes(tmp_path, kind, scan_layers, architecture):
    """The quantized, adapted model's logits equal transformers' on its merged export (the
    base dequantized, the adapters merged; Phi-3's fused again), and its loss is close to
    the same adapters on the full-precision base."""
    from etils import epath
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "base", vocab_size=97, architecture=architecture, hidden_size=64,
                                intermediate_size=128, head_dim=16)
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    targets = ("q_proj", "v_proj", "down_proj")  # the other projections are quantized, not adapted
    lora = LoraSettings(4, 8.0, 0.0, targets, Quantization(kind, 32))
    layout, params = _load(model_dir, lora, scan_layers)
    codes = [n for n in params if is_codes(n, params)]
    assert len(codes) == len(cfg.family.lora_targets) * (1 if scan_layers else cfg.num_hidden_layers)  # every projection
    assert all(params[n].dtype == lora.quantization.code_dtype for n in codes)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 24))
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))

    save_pretrained(params, read_hf_config(model_dir / "config.json"), epath.Path(tmp_path / "merged"), lora_scale=lora.scale)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)

    full_layout, full_params = _load(model_dir, dataclasses.replace(lora, quantization=None), scan_layers)
    assert not any(is_scale(n) for n in full_params)
    gap = abs(_loss(layout, params, ids) - _loss(full_layout, full_params, ids))
    # Measured on this random model: int8 4.7e-5, nf4 3.2e-3 (of a loss of 4.58).
    assert gap < (2e-4 if kind == "int8" else 2e-2), gap


def test_qlora_settings_are_refused_where_they_cannot_work(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="quantize_base set but use_lora is false"):
        rs.SFTConfig(quantize_base="nf4")
    with pytest.raises(ValueError, match="Input should be 'int8' or 'nf4'"):
        rs.SFTConfig(use_lora=True, quantize_base="fp8")
    base = dict(model_name="q", save_directory=str(tmp_path), use_lora=True, quantize_base="int8", num_hosts=1)
    with pytest.raises(ValueError, match="quantization_block_size 64 does not divide q_proj's 32 inputs"):
        rs.SFTTrainer(rs.SFTConfig(**base), tiny_model_dir, train_dataset=[{"text": "a b"}])
    config = rs.SFTConfig(**base, quantization_block_size=16, trainable_parameters=[r"layers\.1\.mlp\.up_proj\.weight"])
    with pytest.raises(FreezingError, match=r"model.layers.1.mlp.up_proj.weight would train, and quantize_base holds it"):
        rs.SFTTrainer(config, tiny_model_dir, train_dataset=[{"text": "a b"}])
