"""The model as every host sees it: the global mesh, the parameter layout and where each
parameter lives on the mesh. Built the same way for training and for export."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from raysft.storage.locations import local_copy, location
from raysft.workers.runtime.mesh import global_mesh
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig, read_hf_config, text_model_config
from raysft.workers.models.export import save_pretrained, write_assets
from raysft.workers.models.loading import load_params, load_quantized
from raysft.workers.models.lora import (
    LAYER_MODULES, LoraSettings, check_rank, initial_adapters, is_adapter, projection_dims, resolve_modules,
)
from raysft.workers.models.quantization import Quantization, quantized_part
from raysft.workers.models.params import ParamLayout
from raysft.workers.models.partition import param_sharding
from raysft.workers.models.peft import read_adapter, save_adapter
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
    lora: LoraSettings | None = None

    @classmethod
    def build(cls, spec: TrainSpec, devices=None, hf_overrides: dict | None = None) -> "ShardedModel":
        """Call after `jax.distributed` is up: the mesh spans every host's devices, and the
        model's files are fetched to this host. Or `devices`: a TPU slice's, for compiling
        only: then only `config.json` is read, with `hf_overrides` over it (a shortened copy
        of the model for cost estimates)."""
        mesh = global_mesh(*spec.sharding_axis_dims, devices=devices, num_slices=spec.num_slices)
        model_dir = ModelSource.parse(spec.model).fetch(weights=devices is None)
        hf_config = read_hf_config(model_dir / "config.json")
        if hf_overrides:  # over the language model's own config (a multimodal checkpoint nests it)
            hf_config = {**text_model_config(hf_config), **hf_overrides}
        config = ModelConfig.from_hf_dict(hf_config, source=str(model_dir / "config.json"))
        runtime = ModelRuntime(
            spec.attn_mechanism, spec.gradient_checkpointing, spec.scan_layers, mesh, spec.moe_capacity_factor,
            spec.moe_expert_parallel,
        )
        lora = lora_settings(spec, config)
        layout = build_layout(config, jnp.dtype(spec.dtype), jnp.dtype(spec.param_dtype), runtime, lora)
        shardings = {name: param_sharding(mesh, name, s.shape) for name, s in layout.shapes.items()}
        return cls(mesh, model_dir, hf_config, config, runtime, layout, shardings, lora)

    def initial_params(self, spec: TrainSpec, names=None) -> tuple[dict[str, jax.Array], int]:
        """Parameters `names` (default: all) as a run starts: the model's own weights, each
        host reading only its shards, and LoRA's fresh adapters (or `lora_init_from`'s);
        and the bytes this host read."""
        names = set(self.layout.names if names is None else names)
        base = {n: s for n, s in self.layout.shapes.items() if n in names and not is_adapter(n)}
        quantized = quantized_part(base)
        plain = {n: s for n, s in base.items() if n not in quantized}
        params, read = load_params(self.model_dir, dataclasses.replace(self.layout, shapes=plain), self._sharding_for)
        if quantized:
            codes, read_codes = load_quantized(
                self.model_dir, quantized, self.lora.quantization, jnp.dtype(spec.param_dtype), self._sharding_for
            )
            params, read = {**params, **codes}, read + read_codes
        adapters = {n: s for n, s in self.layout.shapes.items() if n in names and is_adapter(n)}
        if adapters and spec.lora_init_from:
            params.update(read_adapter(spec.lora_init_from, self.lora, self.config, adapters, self._sharding_for))
        elif adapters:
            out = {name: self.shardings[name] for name in adapters}
            params.update(jax.jit(lambda: initial_adapters(adapters, spec.seed), out_shardings=out)())
        return params, read

    def checkpoint_params(self, checkpoints, step: int, spec: TrainSpec) -> dict[str, jax.Array]:
        """Every parameter at checkpoint `step`: what it trained from the checkpoint, the
        rest (a frozen base) as the run started."""
        params = checkpoints.restore_params(step, self.abstract_params())
        rest = [name for name in self.layout.names if name not in params]
        if rest:
            params.update(self.initial_params(spec, rest)[0])
        return params

    def _sharding_for(self, name: str, shape) -> NamedSharding:
        return self.shardings[name]

    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings: what orbax restores into, what the optimizer is shaped by."""
        return {
            name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.shardings[name])
            for name, s in self.layout.shapes.items()
        }

    def export(self, params: dict[str, jax.Array], out_dir: str, dtype: str, tokenizer_dir: str) -> None:
        """The Hugging Face directory (local or object storage), LoRA's adapters merged
        into their kernels: every host takes part in gathering, host 0 writes."""
        out = location(out_dir)
        save_pretrained(params, self.hf_config, out, dtype=dtype, lora_scale=self.lora and self.lora.scale)
        if jax.process_index() == 0:
            write_assets(out, self.hf_config, self.model_dir, tokenizer_dir=local_copy(tokenizer_dir))

    def export_adapter(self, params: dict[str, jax.Array], out_dir: str, base_model: str, trained: Iterable[str]) -> None:
        """LoRA's adapters as a PEFT adapter directory (`PeftModel.from_pretrained`), with
        the base parameters among `trained` (the names the run trained) saved whole."""
        trained = set(trained)
        save_adapter(
            {n: p for n, p in params.items() if is_adapter(n)}, self.lora, location(out_dir), base_model, self.config,
            {n: p for n, p in params.items() if n in trained and not is_adapter(n)},
        )


def lora_settings(spec: TrainSpec, config: ModelConfig) -> LoraSettings | None:
    if not spec.use_lora:
        return None
    modules = resolve_modules(spec.lora_target_modules, config)
    check_rank(spec.lora_rank, config, modules)
    quantization = None
    if spec.quantize_base:
        quantization = Quantization(spec.quantize_base, spec.quantization_block_size)
        for kind, (fan_in, _) in projection_dims(config).items():
            if kind in LAYER_MODULES:
                quantization.check(fan_in, kind)
    return LoraSettings(spec.lora_rank, spec.lora_alpha, spec.lora_dropout, modules, quantization)
