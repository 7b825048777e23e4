"""Which parameters a run trains at each step: all of them, or LoRA's adapters, less what
the freezing patterns freeze, and with gradual unfreezing only the top decoder layers the
schedule has reached.

Patterns are regular expressions searched in the Hugging Face parameter names users know
(`model.layers.3.mlp.up_proj.weight`; an adapter: `model.layers.3.mlp.up_proj.lora_A.weight`).
A stage is the set of parameters that start training at one step; each stage keeps its
own optimizer state from the step it starts (`workers.training.optimizer`), and what never trains
has none.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from raysft.workers.models.lora import is_adapter
from raysft.workers.models.params import hf_tensors, is_stacked
from raysft.workers.models.quantization import is_codes, is_scale


class FreezingError(ValueError):
    """Freezing settings that select nothing, or leave nothing to train."""


def hf_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """The names users know for one of ours: a tensor per layer of a stacked parameter."""
    if is_adapter(name):
        stem, leaf = name.rsplit(".", 1)
        per_layer = [key for key, _ in hf_tensors(stem + ".kernel", shape)]
        return [key.replace(".weight", ".lora_A.weight" if leaf == "lora_a" else ".lora_B.weight") for key in per_layer]
    return [key for key, _ in hf_tensors(name, shape)]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


@dataclasses.dataclass(frozen=True)
class TrainableSet:
    """`stages`: (first step, the parameter names that start training at it), by step."""

    stages: tuple[tuple[int, tuple[str, ...]], ...]
    total: int  # parameters of the model, in elements
    counts: dict[str, int]  # elements per parameter name

    def stage_at(self, step: int) -> int:
        return max(i for i, (start, _) in enumerate(self.stages) if start <= step)

    def groups_at(self, step: int) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """The stages started by `step`: each (start step, names)."""
        return self.stages[: self.stage_at(step) + 1]

    def names_at(self, step: int) -> list[str]:
        return [name for _, names in self.groups_at(step) for name in names]

    def trainable_count(self, step: int) -> int:
        return sum(self.counts[name] for name in self.names_at(step))

    @classmethod
    def build(
        cls,
        shapes: dict,
        *,
        lora: bool = False,
        trainable_patterns: list[str] | None = None,
        frozen_patterns: list[str] | None = None,
        unfreeze_layers: int | None = None,
        unfreeze_every_steps: int | None = None,
        num_layers: int = 0,
    ) -> "TrainableSet":
        """`shapes`: name -> shape of every parameter. With `lora`, adapters train and the
        base is frozen; `trainable_patterns` then adds base parameters (an embedding to
        train with the adapters), without LoRA they are the only ones trained.
        `frozen_patterns` freezes what they match. With `unfreeze_layers` N, the top N
        decoder layers train from step 0 and N more every `unfreeze_every_steps` steps."""
        codes = {name for name in shapes if is_codes(name, shapes)}
        shapes = {name: tuple(s.shape) if hasattr(s, "shape") else tuple(s) for name, s in shapes.items() if not is_scale(name)}
        counts = {name: _size(shape) for name, shape in shapes.items()}
        chosen = {name for name in shapes if is_adapter(name)} if lora else set(shapes)
        if trainable_patterns:
            selected = _select(shapes, trainable_patterns, "trainable_parameters")
            chosen = chosen | selected if lora else selected
        if frozen_patterns:
            chosen -= _select(shapes, frozen_patterns, "frozen_parameters")
        if not chosen:
            raise FreezingError("the freezing settings leave no parameter to train")
        if chosen & codes:
            raise FreezingError(
                f"{hf_names(min(chosen & codes), shapes[min(chosen & codes)])[0]} would train, and quantize_base "
                "holds it as codes; QLoRA trains adapters (and unquantized parameters: embeddings, norms, lm_head) only"
            )
        order = [name for name in shapes if name in chosen]
        if not unfreeze_layers:
            return cls(((0, tuple(order)),), sum(counts.values()), counts)
        if any(is_stacked(name) for name in order):
            raise FreezingError(
                "unfreeze_schedule unfreezes decoder layers one by one, and scan_layers holds all layers in one "
                "array; set scan_layers false"
            )
        stages = []
        for stage, top in enumerate(range(num_layers, 0, -unfreeze_layers)):
            layers = range(max(top - unfreeze_layers, 0), top)
            names = tuple(n for n in order if layer_of(n) in layers or (stage == 0 and layer_of(n) is None))
            if names:
                stages.append((stage * unfreeze_every_steps, names))
        return cls(tuple(stages), sum(counts.values()), counts)


def _size(shape: Iterable[int]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _select(shapes: dict[str, tuple[int, ...]], patterns: list[str], setting: str) -> set[str]:
    """Our names whose Hugging Face names a pattern matches; a stacked parameter only whole."""
    selected = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise FreezingError(f"{setting} pattern '{pattern}' is not a valid regular expression: {err}") from None
        matched = 0
        for name, shape in shapes.items():
            hits = [bool(regex.search(key)) for key in hf_names(name, shape)]
            if all(hits):
                selected.add(name)
                matched += 1
            elif any(hits):
                raise FreezingError(
                    f"{setting} pattern '{pattern}' matches some layers of {name}, which scan_layers stacks into one "
                    "array; match every layer, or set scan_layers false"
                )
        if not matched:
            examples = [key for name, shape in list(shapes.items())[:6] for key in hf_names(name, shape)[:1]]
            raise FreezingError(
                f"{setting} pattern '{pattern}' matches no parameter; names look like {', '.join(examples)}"
            )
    return selected


def for_run(spec, shapes: dict, num_layers: int, steps_per_epoch: int) -> TrainableSet:
    """The run's trainable set from its `TrainSpec` (an epoch schedule in steps)."""
    schedule = spec.unfreeze_schedule or {}
    every = schedule.get("every_steps") or (schedule.get("every_epochs") or 0) * steps_per_epoch
    return TrainableSet.build(
        shapes,
        lora=spec.use_lora,
        trainable_patterns=spec.trainable_parameters,
        frozen_patterns=spec.frozen_parameters,
        unfreeze_layers=schedule.get("layers"),
        unfreeze_every_steps=every,
        num_layers=num_layers,
    )


def check_run(spec, model_dir) -> None:
    """A run's LoRA and freezing settings against the model's `config.json`, on the driver:
    a bad target, rank, adapter or pattern is one line before any worker starts."""
    import jax.numpy as jnp

    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig, read_hf_config
    from raysft.workers.models.peft import check_adapter, modules_to_save
    from raysft.workers.models.runtime import ModelRuntime
    from raysft.workers.sharded_model import lora_settings

    config_file = model_dir / "config.json"
    cfg = ModelConfig.from_hf_dict(read_hf_config(config_file), source=str(config_file))
    lora = lora_settings(spec, cfg)
    if lora and spec.lora_init_from:
        check_adapter(spec.lora_init_from, lora, cfg)
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime(scan_layers=spec.scan_layers), lora)
    trainable = for_run(spec, layout.shapes, cfg.num_hidden_layers, steps_per_epoch=1)
    if lora:  # the run ends with a PEFT adapter, which must hold whatever trains
        base = {n: layout.shapes[n] for _, names in trainable.stages for n in names if not is_adapter(n)}
        try:
            modules_to_save(base, lora, cfg)
        except ValueError as err:
            raise FreezingError(f"{err}: train it whole (trainable_parameters) or adapt it (lora_target_modules), "
                                "not both") from None
