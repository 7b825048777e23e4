"""Architecture hyper-parameters read from a Hugging Face `config.json`: the fields
every family has, and the switches its family (`workers.models.families`) sets."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from raysft.workers.models.families import SUPPORTED_ARCHITECTURES, Family, family_of



# The gated MLP's activations (`decoder.ACTIVATIONS` computes them).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


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
    hidden_activation: str = "silu"  # the gated MLP's: silu, or gelu_pytorch_tanh (GeGLU)
    # Gemma: norms scale by (1 + weight), in fp32; embeddings are multiplied by sqrt(hidden).
    norm_unit_offset: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this), not 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma 3: sliding layers rotate with their own base and no scaling.
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE on the first 3/4 of each head
    max_position_embeddings: int | None = None  # LongRoPE's attention factor needs it
    # A multimodal checkpoint's language model: its tensors' prefix there (`language_model.`)
    # and the root of its modules in transformers' model (`model.language_model.`).
    checkpoint_prefix: str = ""
    modules_root: str = "model."
    # Mixture of experts (Qwen3-MoE, Mixtral): a sparse layer's MLP is `num_experts` gated
    # MLPs of `moe_intermediate_size`, of which a router picks `num_experts_per_tok` per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the picked experts' probabilities to sum to 1
    sparse_layers: tuple[bool, ...] = ()  # per layer: experts (True) or the dense MLP
    router_aux_loss_coef: float = 0.0  # the checkpoint's weight of the load-balancing loss

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        family = family_of(architecture)
        if family is None:
            raise ModelLoadError(
                f"{source}: architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hf, prefix, root = family.language_model(architecture, hf)
            architecture = hf["architectures"][0]
            heads = hf["num_attention_heads"]
            layers = hf["num_hidden_layers"]
            rope_params = hf.get("rope_parameters") or {}
            if "full_attention" in rope_params:  # per layer type (transformers 5, Gemma 3): the global layers'
                rope_params = rope_params["full_attention"]
            scaling = hf.get("rope_scaling") or (
                rope_params if rope_params.get("rope_type", "default") != "default" else None
            )
            if scaling and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
                scaling = {
                    "original_max_position_embeddings": hf.get("original_max_position_embeddings"), **scaling,
                    "rope_type": "longrope",
                }
            cfg = cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)),
                tie_word_embeddings=hf.get("tie_word_embeddings", family.tied_by_default),
                rope_scaling=_hashable(scaling) if scaling else None,
                architecture=architecture,
                partial_rotary_factor=rope_params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)),
                max_position_embeddings=hf.get("max_position_embeddings"),
                checkpoint_prefix=prefix,
                modules_root=root,
                **family.switches(architecture, hf, layers),
            )
            if cfg.hidden_activation not in ACTIVATIONS:
                raise ValueError(f"hidden activation {cfg.hidden_activation!r} is not one of {', '.join(ACTIVATIONS)}")
            cfg.rope_tables()  # an unsupported rope_scaling fails here, naming the file, not inside a trace
            return cfg
        except KeyError as err:
            raise ModelLoadError(f"{source}: missing field {err.args[0]!r}") from None
        except ValueError as err:  # a switch, activation or RoPE scaling raysft does not take
            raise ModelLoadError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        return cls.from_hf_dict(read_hf_config(path), source=str(path))

    @property
    def family(self) -> Family:
        return family_of(self.architecture)

    def module_name(self, name: str) -> str:
        """The name transformers' model gives a text-model module or tensor (`model.layers.0...`),
        under a multimodal model's language model."""
        return self.modules_root + name[len("model."):] if name.startswith("model.") else name

    @property
    def window_per_layer(self) -> tuple[int | None, ...]:
        return self.sliding_windows or (None,) * self.num_hidden_layers

    def projection_features(self, projection: str) -> int:
        """Output features of a decoder layer's projection (`q_proj`, `up_proj`, ...)."""
        if projection == "q_proj":
            return self.num_attention_heads * self.head_dim
        if projection in ("k_proj", "v_proj"):
            return self.num_key_value_heads * self.head_dim
        return self.intermediate_size if projection in ("gate_proj", "up_proj") else self.hidden_size

    @property
    def sparse_per_layer(self) -> tuple[bool, ...]:
        return self.sparse_layers or (False,) * self.num_hidden_layers

    @property
    def mixes_dense_and_sparse(self) -> bool:
        return len(set(self.sparse_per_layer)) > 1

    @property
    def attention_scale(self) -> float | None:
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    def rope_tables(self) -> tuple["RopeTable", ...]:
        """The rotary tables the layers use: one, or Gemma 3's global then local."""
        rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        scaling = dict(self.rope_scaling or ())
        tables = (RopeTable.of(self.rope_theta, rotary_dim, scaling, self.max_position_embeddings),)
        if self.rope_local_theta is not None:
            tables += (RopeTable.of(self.rope_local_theta, rotary_dim, {}, None),)
        return tables

    @property
    def rope_table_per_layer(self) -> tuple[int, ...]:
        """Each layer's index into `rope_tables()`: Gemma 3's sliding layers take the local one."""
        if self.rope_local_theta is None:
            return (0,) * self.num_hidden_layers
        return tuple(int(w is not None) for w in self.window_per_layer)


@dataclasses.dataclass(frozen=True)
class RopeTable:
    """Per-pair inverse frequencies [rotary_dim // 2] (radians per position) and the factor
    cos and sin are multiplied by. LongRoPE has a second set (`long`) that a batch whose
    positions pass `original_max` uses instead, as transformers switches per batch."""

    inv_freq: np.ndarray
    attention_factor: float = 1.0
    long: np.ndarray | None = None
    original_max: int | None = None

    @classmethod
    def of(cls, theta: float, rotary_dim: int, scaling: dict[str, Any], max_positions: int | None) -> "RopeTable":
        exponent = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
        inv_freq = 1.0 / (theta**exponent)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "llama3":
            return cls(_llama3_scaled(inv_freq, scaling).astype(np.float32))
        if kind == "linear":
            return cls((inv_freq / scaling["factor"]).astype(np.float32))
        if kind == "longrope":
            return _longrope(theta, exponent, scaling, max_positions)
        if kind not in ("default", None):
            raise ModelLoadError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3, longrope)")
        return cls(inv_freq.astype(np.float32))


def _longrope(theta: float, exponent: np.ndarray, scaling: dict[str, Any], max_positions: int | None) -> RopeTable:
    """Phi-3's LongRoPE (as transformers computes it): per-pair factors, short below the
    pre-training length and long past it, and cos/sin scaled by sqrt(1 + ln s / ln L)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or (max_positions / original if max_positions else 1.0)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    # transformers builds these in fp32; so does this, for the same rounding.
    base = np.float32(theta) ** exponent.astype(np.float32)
    short = 1.0 / (np.asarray(scaling["short_factor"], np.float32) * base)
    long = 1.0 / (np.asarray(scaling["long_factor"], np.float32) * base)
    return RopeTable(short.astype(np.float32), float(attention_factor), long.astype(np.float32), int(original))


def _hashable(value):
    """Config values as nested tuples, so `ModelConfig` stays hashable (a static jit argument)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


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


def text_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The config of the model raysft trains from a checkpoint with config `hf`: the
    same, or for a multimodal checkpoint (Gemma 3 4B+) its text-only language model,
    which is what an export writes (the vision tower is not trained, and not exported)."""
    architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    family = family_of(architecture)
    return family.language_model(architecture, hf)[0] if family else hf


def read_hf_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"model config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
