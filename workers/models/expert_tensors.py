"""Where a mixture-of-experts checkpoint keeps its router and experts, for loading and export.

raysft holds a sparse layer's experts as transformers 5's modules do: `mlp.gate` (the
router) and `mlp.experts.{gate,up,down}_proj` [E, in, out]. Checkpoints keep them either
per expert, as the models are published and as transformers saves them
(`mlp.experts.3.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.3.w1.weight`), or
as transformers 5 holds them in memory, fused 3-D (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]). Loading reads either; export writes per expert.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from raysft.workers.models.config import ModelConfig

_EXPERTS = re.compile(r"^(?P<layer>.*layers\.\d+)\.mlp\.experts\.(?P<projection>gate_proj|up_proj|down_proj)$")
_ROUTER = re.compile(r"^(?P<layer>.*layers\.\d+)\.mlp\.gate\.weight$")


def is_experts_key(key: str) -> bool:
    return _EXPERTS.match(key) is not None


def router_key(cfg: ModelConfig, key: str) -> str:
    """The checkpoint's name of a router weight (Mixtral's sits under `block_sparse_moe`)."""
    match = _ROUTER.match(key)
    if match is None or cfg.family.experts is None:
        return key
    return f"{match['layer']}.{cfg.family.experts.block}.gate.weight"


def per_expert_keys(cfg: ModelConfig, key: str) -> list[str]:
    """Each expert's tensor [out, in] of `...layers.N.mlp.experts.gate_proj`, as published."""
    match = _EXPERTS.match(key)
    layout = cfg.family.experts
    name = dict(layout.names)[match["projection"]]
    return [f"{match['layer']}.{layout.block}.experts.{e}.{name}.weight" for e in range(cfg.num_experts)]


def fused_key(cfg: ModelConfig, key: str) -> tuple[str, int, int]:
    """transformers 5's fused tensor [E, out, in] holding `key`, and its rows there."""
    match = _EXPERTS.match(key)
    f = cfg.moe_intermediate_size
    if match["projection"] == "down_proj":
        return f"{match['layer']}.mlp.experts.down_proj", 0, cfg.hidden_size
    start = 0 if match["projection"] == "gate_proj" else f
    return f"{match['layer']}.mlp.experts.gate_up_proj", start, start + f


class ExpertStack:
    """[E, in, out], read lazily from E per-expert tensors [out, in] or from rows
    [start, stop) of a fused [E, out, in] tensor (lazy safetensors slices)."""

    def __init__(self, per_expert: list | None = None, fused=None, rows: tuple[int, int] | None = None):
        self.per_expert, self.fused, self.rows = per_expert, fused, rows

    def get_shape(self) -> list[int]:
        if self.per_expert is not None:
            out, fan_in = self.per_expert[0].get_shape()
            return [len(self.per_expert), fan_in, out]
        experts, _, fan_in = self.fused.get_shape()
        return [experts, fan_in, self.rows[1] - self.rows[0]]

    def __getitem__(self, index):
        experts, fan_in, out = (tuple(index) + (slice(None),) * 3)[:3]
        if self.per_expert is not None:
            chosen = self.per_expert[experts]
            return np.stack([np.asarray(t[out, fan_in]).T for t in chosen])
        rows = range(*self.rows)[out]
        block = self.fused[experts, slice(rows.start, rows.stop, rows.step), fan_in]
        return np.asarray(block).transpose(0, 2, 1)


def expert_stack(cfg: ModelConfig, key: str, has: Callable[[str], bool], open_slice: Callable) -> ExpertStack:
    """The experts tensor `key` from whichever layout the checkpoint holds (`has(name)`,
    `open_slice(name)`: its tensors)."""
    keys = per_expert_keys(cfg, key)
    if all(has(k) for k in keys):
        return ExpertStack(per_expert=[open_slice(k) for k in keys])
    fused, start, stop = fused_key(cfg, key)
    if has(fused):
        return ExpertStack(fused=open_slice(fused), rows=(start, stop))
    raise KeyError(keys[0] if not has(keys[0]) else next(k for k in keys if not has(k)))


def checkpoint_tensors(cfg: ModelConfig, key: str, tensor: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint's tensors for one of ours (our name and layout): each expert's
    [out, in] for an experts tensor [E, in, out], the router under its family's name."""
    if cfg.family.experts is None:
        return {key: tensor}
    if is_experts_key(key):
        return {name: np.ascontiguousarray(tensor[e].T) for e, name in enumerate(per_expert_keys(cfg, key))}
    return {router_key(cfg, key): tensor}
