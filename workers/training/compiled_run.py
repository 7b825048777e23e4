"""Compile a run's programs for a set of devices and read what the compiler reports:
memory per device, the HLO (kernels, collectives) and its cost model's time estimate.

The devices may be a TPU slice that is not attached (compile-only devices from libtpu):
nothing is allocated and no weights are read, only the model's `config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from raysft.workers.models.quantization import stored_bytes
from raysft.workers.sharded_model import ShardedModel
from raysft.workers.spec import TrainSpec
from raysft.workers.training.programs import RunPrograms
from raysft.workers.training.trainable import for_run

# The TPU compiler turns an FSDP all-gather + matmul into a loop ("windowed einsum");
# its cost model counts a loop body once, so time estimates are compiled without them.
_NO_WINDOWED_EINSUM = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


# How the TPU compiler refuses a program that does not fit (it reports no memory analysis).
_OUT_OF_MEMORY = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM")


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """What one compiled program needs per device, in bytes, and how long it compiled.
    A program the compiler refused for memory has only its `total` (from the refusal)."""

    argument: int | None
    output: int | None
    alias: int | None  # outputs written over donated arguments
    temp: int | None  # activations and other temporaries (their allocations, not all live at once)
    # What the device holds at the most: the compiler's peak of live buffers, arguments
    # included. The TPU compiler holds this against the chip's memory to accept a program.
    total: int
    compile_s: float
    out_of_memory: bool = False
    # Refused before compiling: `total` is a lower bound (what the step's arguments and
    # gradients alone need), not the compiler's figure.
    bound_only: bool = False

    @classmethod
    def of(cls, compiled, compile_s: float) -> "ProgramMemory":
        m = compiled.memory_analysis()
        arg, out, alias, temp = (
            m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes
        )
        return cls(arg, out, alias, temp, getattr(m, "peak_memory_in_bytes", 0) or arg + out - alias + temp, compile_s)


def _compile(lowered, options: dict | None = None):
    """(compiled program, seconds to compile it)."""
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=options or {})
    return compiled, time.perf_counter() - start


def _compile_memory(lowered) -> tuple[Any, ProgramMemory]:
    """(compiled program or None, its memory): a refusal for memory is a result here."""
    start = time.perf_counter()
    try:
        compiled, seconds = _compile(lowered)
    except jax.errors.JaxRuntimeError as err:
        match = _OUT_OF_MEMORY.search(str(err))
        if not match:
            raise
        total = int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))
        return None, ProgramMemory(None, None, None, None, total, time.perf_counter() - start, out_of_memory=True)
    return compiled, ProgramMemory.of(compiled, seconds)


def _shard_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings (the largest shard)."""
    return sum(
        stored_bytes(math.prod(x.sharding.shard_shape(x.shape)), x.dtype) for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass
class CompiledRun:
    """A run's programs compiled for `devices`; byte counts are per device."""

    programs: RunPrograms
    param_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    gradient_bytes: int  # the trained parameters' gradients, all live at once where clipped by global norm
    train: ProgramMemory | None = None
    train_hlo: str = ""
    eval: ProgramMemory | None = None
    export: ProgramMemory | None = None  # total: resident parameters + the largest gather
    export_largest_gather: int = 0  # bytes one device receives in the largest gather

    @property
    def uses_splash(self) -> bool | None:
        """Whether the compiled step calls the splash kernel (None: it did not compile)."""
        return "splash" in self.train_hlo if self.train_hlo else None

    @property
    def lower_bound(self) -> int:
        """Bytes per device no train step can do with less: its arguments (parameters,
        optimizer state, batch) and the gradients of what it trains."""
        return self.param_bytes + self.optimizer_bytes + self.batch_bytes + self.gradient_bytes

    @classmethod
    def compile(
        cls, spec: TrainSpec, devices, total_steps: int = 1000, with_eval: bool = True, with_export: bool = True,
        hbm_bytes: int | None = None,
    ) -> "CompiledRun":
        """With `hbm_bytes`, a run whose lower bound is over it is refused without compiling
        (its `train.bound_only`): arithmetic answers in a second where the compiler of a
        70B model's step takes minutes to say the same."""
        model = ShardedModel.build(spec, devices)
        programs = _programs(model, spec, total_steps)
        params, opt_state = model.abstract_params(), programs.abstract_opt_state()
        batch = programs.abstract_batch(spec.total_batch_size, spec.max_sequence_length)
        run = cls(
            programs, _shard_bytes(params), _shard_bytes(opt_state), _shard_bytes(batch),
            _shard_bytes(programs.abstract_trained()) if spec.clip_grad else 0,
        )
        if hbm_bytes is not None and run.lower_bound > hbm_bytes:
            run.train = ProgramMemory(None, None, None, None, run.lower_bound, 0.0, out_of_memory=True, bound_only=True)
            return run
        compiled, run.train = _compile_memory(_lower_train_step(programs, batch))
        run.train_hlo = compiled.as_text() if compiled is not None else ""
        if with_eval:
            run.eval = _compile_memory(programs.eval_step.lower(params, batch))[1]
        if with_export:
            run._compile_export(spec.export_dtype)
        return run

    def _compile_export(self, dtype: str) -> None:
        """Every gather program of the export; its total is all parameter shards (resident
        while exporting) plus the largest gather's output and temporaries."""
        total_s, worst, largest, seen = 0.0, None, 0, {}
        for program, args in self.programs.export_gathers(dtype).values():
            key = (program, tuple((a.shape, a.dtype, getattr(a, "sharding", None)) for a in args))
            if key not in seen:  # parameters of one shape share one compiled program
                seen[key] = _compile_memory(program.lower(*args))[1]
                total_s += seen[key].compile_s
            if worst is None or _beyond_arguments(seen[key]) > _beyond_arguments(worst):
                worst = seen[key]
            largest = max(largest, seen[key].output or 0)
        self.export = ProgramMemory(
            self.param_bytes, worst.output, 0, worst.temp, self.param_bytes + _beyond_arguments(worst), total_s,
            worst.out_of_memory,
        )
        self.export_largest_gather = largest


def _beyond_arguments(memory: ProgramMemory) -> int:
    """What a program holds at its peak besides its arguments (a refused one: its whole total)."""
    return memory.total if memory.out_of_memory else memory.total - memory.argument


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """The compiler cost model's whole-step time: an estimate, not a measurement."""

    seconds: float
    tokens_per_second_per_device: float
    compile_s: float


def estimate_step(spec: TrainSpec, devices, num_layers: int) -> StepEstimate | None:
    """Whole-step time from the TPU cost model, made whole where it counts a loop once.

    The cost model counts a loop body once: the scanned layers, the chunked loss, the
    micro-batch scan, and the compiler's own windowed-einsum loops. So two copies of the
    step are compiled without any of them (unscanned, one chunk, one micro-batch,
    windowed einsum off), with 1 and 2 decoder layers (a copy of none would have no
    adapters for a LoRA run to train): one layer is their difference, the rest the base,
    and the step micro-batches x (base + layers x one layer). The micro-batches' copies of the
    optimizer update are counted too (a small overcount). None where the cost model has
    no usable answer (libtpu 0.0.42 gives negative times for v4 and v5e programs).

    A dropless mixture of experts is estimated at balanced routing: the cost model gives
    negative times for ragged matmuls and ragged all-to-alls, so its copies route with
    `moe_capacity_factor` 1 (each expert exactly its share, fixed-shape buffers, regular
    all-to-alls), the same FLOPs and traffic as dropless routing when the router balances.
    """
    micro = dataclasses.replace(
        spec,
        scan_layers=False,
        loss_chunk_size=None,
        gradient_accumulation_steps=1,
        total_batch_size=spec.total_batch_size // spec.gradient_accumulation_steps,
        moe_capacity_factor=spec.moe_capacity_factor or 1.0,
    )
    seconds, compile_s = [], 0.0
    for layers in (1, 2):
        model = ShardedModel.build(micro, devices, hf_overrides={"num_hidden_layers": layers, "layer_types": None})
        programs = _programs(model, micro, total_steps=1000)
        lowered = _lower_train_step(programs, programs.abstract_batch(micro.total_batch_size, micro.max_sequence_length))
        compiled, took = _compile(lowered, _NO_WINDOWED_EINSUM)
        compile_s += took
        seconds.append(float(_cost(compiled).get("optimal_seconds", float("nan"))))
    one_layer = seconds[1] - seconds[0]
    base = seconds[0] - one_layer
    if not all(0 < s < math.inf for s in seconds) or one_layer <= 0 or base < 0:
        return None
    step_s = spec.gradient_accumulation_steps * (base + num_layers * one_layer)
    tokens = spec.total_batch_size * spec.max_sequence_length
    return StepEstimate(step_s, tokens / step_s / len(devices), compile_s)


def _programs(model: ShardedModel, spec: TrainSpec, total_steps: int) -> RunPrograms:
    """The programs of the run's largest stage: LoRA's adapters or what freezing leaves,
    with every layer an `unfreeze_schedule` unfreezes (its last stage trains the most)."""
    trainable = for_run(spec, model.layout.shapes, model.config.num_hidden_layers, steps_per_epoch=1)
    return RunPrograms.build(model, spec, total_steps, trainable.stages)


def _lower_train_step(programs: RunPrograms, batch):
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return programs.train_step.lower(
        programs.abstract_trained(), programs.abstract_opt_state(), batch, programs.abstract_frozen(), step
    )


def _cost(compiled) -> dict[str, Any]:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
