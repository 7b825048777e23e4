"""LoRA adapters of a mixture's experts in PEFT's layout, and back.

PEFT adapts transformers 5's expert tensors as parameters (`target_parameters`:
`mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj` [E, D, F]), each with
`lora_A.weight` [r E, in] (expert-major rows) and `lora_B.weight` [out, r E] (rank-major
columns: column j E + e is expert e's j-th). The two wrap one module, gate_up's inside:
its tensors are named `mlp.experts.base_layer.lora_A.weight`, down's `mlp.experts.lora_A.weight`.

raysft gives gate and up each their own adapters (as it does Phi-3's fused projections),
written as one adapter of rank 2r: A = [A_gate; A_up] and a block-diagonal B, exact, with
gate_up's rank and alpha doubled (`rank_pattern`, `alpha_pattern`). An adapter PEFT
trained (rank r, one A for gate and up) reads back exactly: gate and up both take its A
and their rows of B.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from raysft.workers.models.config import ModelConfig

TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_MODULE = "mlp.experts"


def peft_key(layer_key: str, leaf: str) -> str:
    """PEFT's name (without its `base_model.model.` prefix) of `leaf` (lora_A or lora_B) of
    `model.layers.N.mlp.experts.gate_up_proj` or `...down_proj`."""
    module, parameter = layer_key.rsplit(".", 1)
    return f"{module}{'.base_layer' if parameter == 'gate_up_proj' else ''}.{leaf}.weight"


def adapted_experts(modules: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT's target parameters for the expert projections LoRA adapts."""
    gate_up = any(m in modules for m in ("experts.gate_proj", "experts.up_proj"))
    down = "experts.down_proj" in modules
    return tuple(t for t, on in zip(TARGET_PARAMETERS, (gate_up, down)) if on)


def _both_halves(modules: tuple[str, ...]) -> bool:
    return "experts.gate_proj" in modules and "experts.up_proj" in modules


def _peft_layout(a_ExIxR, b_ExRxO):
    """Ours A [..., E, in, R], B [..., E, R, out] -> PEFT's [..., R E, in] and [..., out, R E]."""
    *lead, e, fan_in, r = a_ExIxR.shape
    a = jnp.swapaxes(a_ExIxR, -1, -2).reshape(*lead, e * r, fan_in)
    b = jnp.moveaxis(b_ExRxO, -3, -1)  # [..., R, out, E]
    b = jnp.swapaxes(b, -3, -2).reshape(*lead, b_ExRxO.shape[-1], r * e)  # [..., out, R E], column j E + e
    return a, b


def peft_expert_adapters(adapters: dict[str, jax.Array], modules: tuple[str, ...], rank: int) -> dict[str, jax.Array]:
    """`adapters` with the experts' replaced by PEFT's gate_up and down adapters, named
    `...mlp.experts.gate_up_proj.lora_a` (already in PEFT's layout)."""
    out = dict(adapters)
    for a_name in [n for n in adapters if n.endswith("experts.down_proj.lora_a") or n.endswith("experts.gate_proj.lora_a")
                   or n.endswith("experts.up_proj.lora_a")]:
        if a_name not in out:
            continue
        stem = a_name.rsplit("experts.", 1)[0] + "experts."
        parts = [p for p in ("gate_proj", "up_proj") if f"{stem}{p}.lora_a" in out]
        if parts:
            a = [out.pop(f"{stem}{p}.lora_a") for p in parts]
            b = [out.pop(f"{stem}{p}.lora_b") for p in parts]
            f = (b[0].shape[-1],)
            if len(parts) == 1:  # the other half of gate_up has no adapter: zero rows of B
                zeros = jnp.zeros(b[0].shape[:-1] + f, b[0].dtype)
                b_full = jnp.concatenate([b[0], zeros] if parts == ["gate_proj"] else [zeros, b[0]], axis=-1)
                a_full = a[0]
            else:  # A = [A_gate A_up] (rank 2r), B block-diagonal
                top = jnp.concatenate([b[0], jnp.zeros_like(b[1])], axis=-1)
                bottom = jnp.concatenate([jnp.zeros_like(b[0]), b[1]], axis=-1)
                a_full, b_full = jnp.concatenate(a, axis=-1), jnp.concatenate([top, bottom], axis=-2)
            out[f"{stem}gate_up_proj.lora_a"], out[f"{stem}gate_up_proj.lora_b"] = _peft_layout(a_full, b_full)
        if f"{stem}down_proj.lora_a" in out:
            a, b = out.pop(f"{stem}down_proj.lora_a"), out.pop(f"{stem}down_proj.lora_b")
            out[f"{stem}down_proj.lora_a"], out[f"{stem}down_proj.lora_b"] = _peft_layout(a, b)
    return out


def peft_patterns(modules: tuple[str, ...], rank: int, alpha: float) -> tuple[dict, dict]:
    """PEFT's rank and alpha for gate_up where raysft writes it at rank 2r (PEFT matches a
    pattern against the end of `module.parameter`)."""
    if not _both_halves(modules):
        return {}, {}
    return {TARGET_PARAMETERS[0]: 2 * rank}, {TARGET_PARAMETERS[0]: 2 * alpha}


def split_expert_adapter(tensors: dict[str, np.ndarray], cfg: ModelConfig, rank: int) -> dict[str, np.ndarray]:
    """A PEFT adapter's expert tensors as ours, per layer, by name
    `...model.layers.N.mlp.experts.gate_proj.lora_a` in our layout (A [E, in, r],
    B [E, r, out]): from `peft_expert_adapters` (rank 2r, block-diagonal) each part
    takes its block; from PEFT's own training (rank r), gate and up share A."""
    out = dict(tensors)
    e, f = cfg.num_experts, cfg.moe_intermediate_size
    for key in [k for k in tensors if k.endswith(f"{_MODULE}.base_layer.lora_A.weight")]:
        stem = key[: -len("base_layer.lora_A.weight")]
        a, b = tensors[key], tensors[f"{stem}base_layer.lora_B.weight"]
        r_full = a.shape[0] // e
        a_e = a.reshape(e, r_full, -1)  # [E, R, D]
        b_e = b.reshape(b.shape[0], r_full, e).transpose(2, 0, 1)  # [E, 2F, R]
        for i, part in enumerate(("gate_proj", "up_proj")):
            cols = slice(i * rank, (i + 1) * rank) if r_full == 2 * rank else slice(0, rank)
            out[f"{stem}{part}.lora_a"] = np.ascontiguousarray(a_e[:, cols].transpose(0, 2, 1))
            out[f"{stem}{part}.lora_b"] = np.ascontiguousarray(b_e[:, i * f:(i + 1) * f, cols].transpose(0, 2, 1))
    for key in [k for k in tensors if k.endswith(f"{_MODULE}.lora_A.weight")]:
        stem = key[: -len("lora_A.weight")]
        a, b = tensors[key], tensors[f"{stem}lora_B.weight"]
        a_e, b_e = a.reshape(e, rank, -1), b.reshape(b.shape[0], rank, e).transpose(2, 0, 1)
        out[f"{stem}down_proj.lora_a"] = np.ascontiguousarray(a_e.transpose(0, 2, 1))
        out[f"{stem}down_proj.lora_b"] = np.ascontiguousarray(b_e.transpose(0, 2, 1))
    return out
