"""LoRA adapters as parameters of their own, and their PEFT names.

An adapted projection `y = x W` becomes `y = x W + (alpha / r) * dropout(x) A B` with
`A` [in, r] and `B` [r, out] (`q_proj.lora_a`, `q_proj.lora_b`, next to `q_proj.kernel`),
so sharding rules, checkpoints and the optimizer address adapters by name like any other
parameter, and the frozen base is never differentiated. Under QLoRA the base is a
`QuantizedLinear` (`workers.models.quantization`) with the same adapters.

Written here rather than with qwix's LoRA provider: qwix creates adapters by intercepting
the model's matmuls on a first call with real inputs, while raysft declares every
parameter in an abstract layout before any weight exists (sharding, loading, resuming and
`raysft plan`'s compile-only TPU programs all start from it), and calls its decoder
layers merged inside `lax.scan` and remat; a module with declared adapters keeps their
names, shapes and shardings static.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.config import ModelConfig
from raysft.workers.models.families import EXPERT_PROJECTIONS, FAMILIES
from raysft.workers.models.quantization import Quantization, QuantizedLinear

# Every family's decoder-layer projections (QLoRA quantizes the bases of these).
LAYER_MODULES = tuple(dict.fromkeys(name for family in FAMILIES for name in family.lora_targets))
ADAPTER_LEAVES = ("lora_a", "lora_b")
ADAPTER_DTYPE = jnp.float32  # adapters train in fp32 whatever the base weights' dtype


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]  # adapted projections, the same in every decoder layer
    quantization: Quantization | None = None  # QLoRA: every decoder-layer projection's base

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_LEAVES


def adapted_kernel(name: str) -> str:
    """`...q_proj.lora_a` -> `...q_proj.kernel`."""
    return name.rsplit(".", 1)[0] + ".kernel"


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def checkpoint_projections(cfg: ModelConfig) -> tuple[str, ...]:
    """The decoder-layer modules LoRA may adapt as the checkpoint (and PEFT) names them:
    Phi-3's `qkv_proj` for raysft's `q_proj`, `k_proj` and `v_proj`."""
    return tuple(dict.fromkeys(cfg.family.checkpoint_projection(kind) for kind in cfg.family.lora_targets))


def module_names(cfg: ModelConfig) -> list[str]:
    """The Hugging Face names of the modules LoRA may adapt, as PEFT matches them."""
    names = [
        cfg.module_name(f"model.layers.{layer}.{cfg.family.module_path(kind)}")
        for layer in range(cfg.num_hidden_layers)
        for kind in checkpoint_projections(cfg)
    ]
    return names if cfg.tie_word_embeddings else [*names, "lm_head"]


def _kind(name: str) -> str:
    """The projection a full module name ends with: `q_proj`, or `experts.gate_proj`."""
    parts = name.rsplit(".", 2)
    return ".".join(parts[-2:]) if len(parts) == 3 and parts[-2] == "experts" else parts[-1]


def resolve_modules(targets: str | list[str], cfg: ModelConfig) -> tuple[str, ...]:
    """The projections `lora_target_modules` names, with PEFT's rules over the checkpoint's
    module names: "all-linear" (every projection but the output layer; not a mixture's
    experts, which are not Linear modules in transformers), a list of names (a module
    whose name is one, or ends with "." and one; "experts" names all three projections of
    every expert), or one string as a regular expression over the full module names. A
    fused module (Phi-3's `qkv_proj`) adapts each projection it holds."""
    names, kinds = module_names(cfg), checkpoint_projections(cfg)
    if targets == "all-linear":
        return tuple(kind for kind in cfg.family.lora_targets if kind not in EXPERT_PROJECTIONS)
    if isinstance(targets, list) and "experts" in targets:
        targets = [t for t in targets if t != "experts"] + [p for p in EXPERT_PROJECTIONS if p in kinds]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"lora_target_modules {targets!r} is not a valid regular expression: {err}") from None
        matched = [n for n in names if pattern.fullmatch(n)]
    else:
        matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    adapted = sorted({_kind(n) for n in matched}, key=[*kinds, "lm_head"].index)
    if not matched:
        raise ValueError(
            f"lora_target_modules {targets!r} matches none of the model's projections; it can name "
            f"{', '.join([*kinds, *names[len(kinds) * cfg.num_hidden_layers:]])} "
            f"(full names like {names[0]!r}), or be 'all-linear'"
        )
    for kind in adapted:
        layers = sorted({int(_LAYER.search(n)[1]) for n in matched if n.endswith("." + kind) and _LAYER.search(n)})
        if kind != "lm_head" and len(layers) != cfg.num_hidden_layers:
            raise ValueError(
                f"lora_target_modules {targets!r} adapts {kind} in layers {layers} only; raysft adapts a projection "
                "in every decoder layer or in none"
            )
    return tuple(part for kind in adapted for part in cfg.family.parts(kind))


def peft_target_modules(modules: tuple[str, ...], cfg: ModelConfig) -> list[str] | str:
    """`target_modules` for PEFT: the checkpoint's names of the adapted modules, or for a
    multimodal model a pattern over its language model's (a plain name would also adapt
    the vision tower's modules of that name). Experts are PEFT's `target_parameters`
    (`expert_adapters`)."""
    names = list(dict.fromkeys(cfg.family.checkpoint_projection(m) for m in modules if m not in EXPERT_PROJECTIONS))
    if cfg.modules_root == "model.":
        return names
    layers = [n for n in names if n != "lm_head"]
    pattern = re.escape(cfg.modules_root) + r"layers\.\d+\.(self_attn|mlp)\.(" + "|".join(layers) + ")"
    return pattern + ("|lm_head" if "lm_head" in names else "")


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each projection kind."""
    return {
        "q_proj": (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
        "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim),
        "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim),
        "o_proj": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
        "experts.gate_proj": (cfg.hidden_size, cfg.moe_intermediate_size),
        "experts.up_proj": (cfg.hidden_size, cfg.moe_intermediate_size),
        "experts.down_proj": (cfg.moe_intermediate_size, cfg.hidden_size),
        "lm_head": (cfg.hidden_size, cfg.vocab_size),
    }


def check_rank(rank: int, cfg: ModelConfig, modules: tuple[str, ...]) -> None:
    """A rank past the smallest adapted dimension adds no capacity, only parameters."""
    dims = projection_dims(cfg)
    smallest = min(min(dims[m]) for m in modules)
    if rank > smallest:
        raise ValueError(f"lora_rank {rank} is larger than the smallest adapted dimension ({smallest}) of {', '.join(modules)}")


class Adapted:
    """Adds `(alpha / r) * dropout(x) A B` to a projection's output; `B` starts at zero, so
    the adapted model starts as the base model (`A` as PEFT draws it: uniform in +-1/sqrt(in))."""

    def _add_adapters(self, fan_in: int, fan_out: int, lora: LoraSettings, rngs: nnx.Rngs) -> None:
        bound = 1.0 / fan_in**0.5
        self.lora_a = nnx.Param(jax.random.uniform(rngs.params(), (fan_in, lora.rank), ADAPTER_DTYPE, -bound, bound))
        self.lora_b = nnx.Param(jnp.zeros((lora.rank, fan_out), ADAPTER_DTYPE))
        self.lora_scale, self.lora_dropout = lora.scale, lora.dropout

    def __call__(self, x, dropout_key=None):
        y = super().__call__(x)
        if self.lora_dropout and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return y + (x @ a) @ b * jnp.asarray(self.lora_scale, x.dtype)


class LoRALinear(Adapted, nnx.Linear):
    def __init__(self, fan_in: int, fan_out: int, lora: LoraSettings, *, rngs: nnx.Rngs, **kwargs):
        nnx.Linear.__init__(self, fan_in, fan_out, rngs=rngs, **kwargs)
        self._add_adapters(fan_in, fan_out, lora, rngs)


class QLoRALinear(Adapted, QuantizedLinear):
    def __init__(self, fan_in: int, fan_out: int, lora: LoraSettings, *, rngs: nnx.Rngs, **kwargs):
        QuantizedLinear.__init__(self, fan_in, fan_out, lora.quantization, rngs=rngs, **kwargs)
        self._add_adapters(fan_in, fan_out, lora, rngs)


def linear(fan_in: int, fan_out: int, kind: str, lora: LoraSettings | None, **kwargs) -> nnx.Module:
    """Projection `kind` of a decoder layer (or `lm_head`): plain, adapted where LoRA
    targets it, its base quantized under QLoRA (every decoder-layer projection)."""
    adapted = lora is not None and kind in lora.modules
    if lora is not None and lora.quantization is not None and kind in LAYER_MODULES:
        if adapted:
            return QLoRALinear(fan_in, fan_out, lora, **kwargs)
        return QuantizedLinear(fan_in, fan_out, lora.quantization, **kwargs)
    return LoRALinear(fan_in, fan_out, lora, **kwargs) if adapted else nnx.Linear(fan_in, fan_out, **kwargs)


def project(module: nnx.Module, x, dropout_key=None):
    """`module(x)`, with LoRA dropout drawn from `dropout_key` where it is adapted."""
    return module(x, dropout_key) if isinstance(module, Adapted) else module(x)


def child_key(key, index: int):
    return None if key is None else jax.random.fold_in(key, index)


def initial_adapters(shapes: dict[str, jax.ShapeDtypeStruct], seed: int) -> dict[str, jax.Array]:
    """Fresh adapters for a loaded base: `A` uniform in +-1/sqrt(in) from (seed, name),
    `B` zero. Pure, so one jitted call places them sharded."""
    out = {}
    for name, s in shapes.items():
        if name.endswith(".lora_b"):
            out[name] = jnp.zeros(s.shape, s.dtype)
        elif name.endswith(".lora_a"):
            digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            key = jax.random.fold_in(jax.random.PRNGKey(seed), digest)
            bound = 1.0 / s.shape[-2] ** 0.5
            out[name] = jax.random.uniform(key, s.shape, s.dtype, -bound, bound)
    return out


def merged_kernel(kernel, lora_a, lora_b, scale: float):
    """W + scale * A B in fp32 (a stacked [L, in, out] kernel: per layer)."""
    delta = jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
    return kernel.astype(jnp.float32) + scale * delta
