"""The model as every host sees it: the global mesh, the parameter layout and where each
parameter lives on the mesh. Built the same way for training and for export."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from raysft.data.locations import local_copy, location
from raysft.workers.mesh import global_mesh, param_sharding
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig, read_hf_config
from raysft.workers.models.export import save_pretrained, write_assets
from raysft.workers.models.params import ParamLayout
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.models.source import ModelSource
from raysft.workers.spec import TrainSpec


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    mesh: Mesh
    model_dir: Path
    hf_config: dict[str, Any]
    config: ModelConfig
    runtime: ModelRuntime
    layout: ParamLayout
    shardings: dict[str, NamedSharding]

    @classmethod
    def build(cls, spec: TrainSpec, devices=None, hf_overrides: dict | None = None) -> "ShardedModel":
        """Call after `jax.distributed` is up: the mesh spans every host's devices, and the
        model's files are fetched to this host. Or `devices`: a TPU slice's, for compiling
        only: then only `config.json` is read, with `hf_overrides` over it (a shortened copy
        of the model for cost estimates)."""
        mesh = global_mesh(*spec.sharding_axis_dims, devices=devices, num_slices=spec.num_slices)
        model_dir = ModelSource.parse(spec.model).fetch(weights=devices is None)
        hf_config = {**read_hf_config(model_dir / "config.json"), **(hf_overrides or {})}
        config = ModelConfig.from_hf_dict(hf_config, source=str(model_dir / "config.json"))
        runtime = ModelRuntime(spec.attn_mechanism, spec.gradient_checkpointing, spec.scan_layers, mesh)
        layout = build_layout(config, jnp.dtype(spec.dtype), jnp.dtype(spec.param_dtype), runtime)
        shardings = {name: param_sharding(mesh, name, s.shape) for name, s in layout.shapes.items()}
        return cls(mesh, model_dir, hf_config, config, runtime, layout, shardings)

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings: what orbax restores into, what the optimizer is shaped by."""
        return {
            name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.shardings[name])
            for name, s in self.layout.shapes.items()
        }

    def export(self, params: dict[str, jax.Array], out_dir: str, dtype: str, tokenizer_dir: str) -> None:
        """The Hugging Face directory (local or object storage): every host takes part in
        gathering, host 0 writes."""
        out = location(out_dir)
        save_pretrained(params, self.hf_config, out, dtype=dtype)
        if jax.process_index() == 0:
            write_assets(out, self.hf_config, self.model_dir, tokenizer_dir=local_copy(tokenizer_dir))
