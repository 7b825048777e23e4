"""Projections a checkpoint stores fused (Phi-3's `qkv_proj` and `gate_up_proj`): raysft
holds them split, as every other family does, so sharding, LoRA and attention are the
same code; here is where each split tensor lies in its fused one, for loading and export."""

from __future__ import annotations

from raysft.workers.models.config import ModelConfig


def fused_rows(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """For each split tensor a fused checkpoint lacks (Hugging Face style, per layer:
    `model.layers.0.self_attn.k_proj.weight`), the fused tensor holding it and its rows
    [start, stop) there (torch's [out, in] layout: rows are output features)."""
    rows = {}
    for layer in range(cfg.num_hidden_layers):
        for fused, parts in cfg.family.fused:
            block = fused.rsplit(".", 1)[0]
            start = 0
            for part in parts:
                stop = start + cfg.projection_features(part)
                for leaf in ("weight", "bias"):
                    prefix = f"model.layers.{layer}"
                    rows[f"{prefix}.{block}.{part}.{leaf}"] = (f"{prefix}.{fused}.{leaf}", start, stop)
                start = stop
    return rows


class RowSlice:
    """Rows [start, stop) of a lazily sliced safetensors tensor, sliced lazily too."""

    def __init__(self, tensor, start: int, stop: int):
        self.tensor, self.start, self.stop = tensor, start, stop

    def get_shape(self) -> list[int]:
        return [self.stop - self.start, *self.tensor.get_shape()[1:]]

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first = range(self.start, self.stop)[index[0]]
        return self.tensor[(slice(first.start, first.stop, first.step), *index[1:])]
