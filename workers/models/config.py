"""Architecture hyper-parameters read from a Hugging Face `config.json`.

Llama, Mistral, Qwen2 and Qwen3 are one decoder with a few switches (projection biases,
q/k norms, sliding windows), so one config and one model cover them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelLoadError(ValueError):
    """A model directory or file that cannot be loaded; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: attend to at most this many most recent tokens (itself included), or None.
    sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = hf["num_attention_heads"]
            layers = hf["num_hidden_layers"]
            rope_params = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or (
                rope_params if rope_params.get("rope_type", "default") != "default" else None
            )
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
                architecture=architecture,
                **_architecture_switches(architecture, hf, layers),
            )
        except KeyError as err:
            raise ModelLoadError(f"{source}: missing field {err.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        return cls.from_hf_dict(read_hf_config(path), source=str(path))

    @property
    def window_per_layer(self) -> tuple[int | None, ...]:
        return self.sliding_windows or (None,) * self.num_hidden_layers

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


def _architecture_switches(architecture: str, hf: dict[str, Any], layers: int) -> dict[str, Any]:
    """What differs between the supported architectures, with transformers' defaults."""
    if architecture == "LlamaForCausalLM":
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if architecture == "MistralForCausalLM":
        window = hf.get("sliding_window")
        return dict(sliding_windows=(window,) * layers if window else ())
    # Qwen2 and Qwen3 window only layers from `max_window_layers` on, and only when asked.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)
    ]
    windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    windows = windows if any(windows) else ()
    if architecture == "Qwen2ForCausalLM":
        return dict(qkv_bias=True, sliding_windows=windows)
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_windows=windows)


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
