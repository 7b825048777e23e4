"""Our Flax Llama against transformers' PyTorch implementation (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_llama


def _reference_logits(model_dir, input_ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.from_numpy(input_ids)).logits.numpy()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True, "num_key_value_heads": 1},
        {"num_key_value_heads": 4, "head_dim": 16},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ],
    ids=["untied-gqa2", "tied-mqa", "mha-headdim16", "llama3-rope"],
)
def test_logits_match_transformers(tmp_path, overrides):
    model_dir = save_tiny_llama(tmp_path, vocab_size=97, **overrides)
    input_ids = np.random.default_rng(0).integers(0, 97, size=(2, 48)).astype(np.int64)

    ours = np.asarray(rs.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids))
    ref = _reference_logits(model_dir, input_ids)

    assert ours.shape == ref.shape == (2, 48, 97)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_packed_segments_match_documents_run_alone(tmp_path):
    model_dir = save_tiny_llama(tmp_path, vocab_size=97)
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

    model_dir = save_tiny_llama(tmp_path, vocab_size=97)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)


def test_missing_model_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=f"model directory not found: {missing}"):
        rs.AutoModelForCausalLM.from_pretrained(missing)


def test_model_directory_without_weights_names_the_path(tmp_path):
    model_dir = save_tiny_llama(tmp_path, vocab_size=97)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"no model.safetensors .* in model directory {model_dir}"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)


def test_model_directory_without_config_names_the_path(tmp_path):
    model_dir = save_tiny_llama(tmp_path, vocab_size=97)
    (model_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=f"^model directory {model_dir} has no config.json$"):
        rs.AutoModelForCausalLM.from_pretrained(model_dir)
