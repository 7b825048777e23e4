"""SmolLM2-135M-Instruct and Gemma 3 270M from their GGUF files: our import against
transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import torch

import raysft as rs


def _ours_and_reference(gguf_file, prompt, **options):
    """Our model of `gguf_file`, its tokenizer, and the logits of `prompt` from our import
    and from transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = rs.AutoModelForCausalLM.from_pretrained(gguf_file, **options)
    tokenizer = AutoTokenizer.from_pretrained(ours.model_dir)
    ids = np.array([tokenizer(prompt)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = reference.eval()(torch.from_numpy(ids)).logits.numpy()
    return ours, tokenizer, np.asarray(ours(ids)), ref_logits


def test_smollm2_logits_match_transformers_gguf_loader(gguf_file, smollm2_cache, monkeypatch):
    monkeypatch.setenv("RAYSFT_CACHE", str(smollm2_cache))
    _, tokenizer, our_logits, ref_logits = _ours_and_reference(
        gguf_file, "The capital of France is Paris. The capital of Italy is"
    )
    # Both dequantize the same Q4_1/Q8_0 blocks to fp32, so only fp32 summation order differs
    # across 30 layers: logits are O(10), and 1e-3 absolute is ~1e-4 relative.
    np.testing.assert_allclose(our_logits, ref_logits, atol=1e-3, rtol=0)
    assert tokenizer.decode(int(our_logits[0, -1].argmax())).strip() == "Rome"


def test_gemma3_270m_logits_match_transformers_gguf_loader(gemma3_gguf_file, smollm2_cache, monkeypatch):
    """Real Gemma 3 weights (18 layers, 5 sliding : 1 global with a window of 512, local
    and global RoPE, q/k norms, one KV head of 256)."""
    monkeypatch.setenv("RAYSFT_CACHE", str(smollm2_cache))
    ours, tokenizer, our_logits, ref_logits = _ours_and_reference(
        gemma3_gguf_file, "The capital of France is Paris. The capital of Germany is", scan_layers=True
    )
    assert ours.config.architecture == "Gemma3ForCausalLM" and ours.config.sliding_windows[:6] == (512,) * 5 + (None,)
    # Logits up to ~25 over 18 layers of fp32 (measured: 4e-5 apart).
    np.testing.assert_allclose(our_logits, ref_logits, atol=1e-3, rtol=0)
    assert tokenizer.decode(int(our_logits[0, -1].argmax())).strip() == "Berlin"


def test_a_gguf_model_without_torch_is_refused_in_one_line_before_converting(gguf_file, tmp_path, monkeypatch):
    import importlib.util

    import pytest

    from raysft.workers.models.config import ModelLoadError
    from raysft.workers.models.gguf_import import convert_gguf

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf: .* pip install 'raysft\[gguf\]'"):
        convert_gguf(gguf_file, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-converted left behind
