"""Architecture hyper-parameters read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


class ModelLoadError(ValueError):
    """A model directory or file that cannot be loaded; the message names it."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    architecture: str = "LlamaForCausalLM"

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = hf["num_attention_heads"]
            rope_params = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or (
                rope_params if rope_params.get("rope_type", "default") != "default" else None
            )
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
                architecture=architecture,
            )
        except KeyError as err:
            raise ModelLoadError(f"{source}: missing field {err.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: Path) -> "LlamaConfig":
        return cls.from_hf_dict(read_hf_config(path), source=str(path))

    def rope_inverse_frequencies(self) -> np.ndarray:
        """Per-pair inverse frequencies [head_dim // 2] in radians per position."""
        exponent = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta**exponent)
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            inv_freq = _llama3_scaled(inv_freq, scaling)
        elif kind not in ("default", None):
            raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (default, llama3)")
        return inv_freq.astype(np.float32)


def _llama3_scaled(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE rescaling (as in transformers)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, smoothed, scaled)


def read_hf_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"model config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
