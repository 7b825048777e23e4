"""`raysft plan` / `rs.plan`: will a run fit its TPU slice, and how fast would it be?

The run's own programs (train step, eval step, export gather) are compiled for the
slice's devices, which libtpu describes on any machine, without a TPU and without the
weights (only `config.json`). Memory per chip comes from the compiler and is held
against the chip's HBM. When the run does not fit, candidate changes are compiled,
smallest first, and the first that fits is named.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.plan_search import Change, candidate_changes, strongest
from raysft.orchestrator.tpu import TpuSlice
from raysft.workers.models.config import ModelConfig, read_hf_config, text_model_config
from raysft.workers.runtime.chips import GiB
from raysft.workers.spec import TrainSpec
from raysft.workers.training.compiled_run import CompiledRun, StepEstimate, estimate_step
from raysft.workers.training.flops import flops_per_token

# Deeper unscanned models take the TPU compiler minutes on a small head.
UNSCANNED_WARNING_LAYERS = 16
# Candidates a search compiles, cheapest first, before it asks whether anything fits.
MAX_CANDIDATES = 12


class DoesNotFit(ValueError):
    """The run's step needs more memory per chip than the chip has; the message is one line."""


@dataclasses.dataclass
class Plan:
    config: SFTConfig
    model_dir: Path
    tpu: TpuSlice
    parameters: int
    compiled: CompiledRun
    estimate: StepEstimate | None = None
    estimated: bool = False  # an estimate was asked for (it may have come back empty)
    fix: Change | None = None  # the smallest change that fits, when this does not
    fix_total: int | None = None
    tried: list[tuple[Change, int]] = dataclasses.field(default_factory=list)

    @property
    def hbm(self) -> int:
        """What the TPU compiler lets one program use on this chip."""
        return self.tpu.chip.usable_hbm_bytes

    @property
    def unit(self) -> str:
        """What one program runs on: a chip, or a TensorCore where each is its own device."""
        return "chip" if self.tpu.chip.devices_per_chip == 1 else "device"

    @property
    def programs(self) -> list:
        return [p for p in (self.compiled.train, self.compiled.eval, self.compiled.export) if p is not None]

    @property
    def total(self) -> int:
        """What the most demanding program compiled needs per chip."""
        return max(p.total for p in self.programs)

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm and not any(p.out_of_memory for p in self.programs)

    def verdict(self) -> str:
        """One line: fits with its headroom, or not with the smallest change that fits."""
        chip = self.tpu.chip.name
        if self.fits:
            return f"fits: {self.total / GiB:.2f} GiB of {self.hbm / GiB:.2f} GiB per {chip} {self.unit}"
        if self.compiled.train.bound_only:
            line = (f"does not fit: at least {self.total / GiB:.2f} GiB per {self.unit} for the parameters, "
                    f"optimizer state and gradients alone, {(self.total - self.hbm) / GiB:.2f} GiB over what a {chip} "
                    f"{self.unit} has ({self.hbm / GiB:.2f} GiB)")
        else:
            line = (f"does not fit: {self.total / GiB:.2f} GiB per {self.unit}, a {chip} {self.unit} has "
                    f"{self.hbm / GiB:.2f} GiB")
        if self.fix is not None:
            return f"{line}; smallest change that fits: {self.fix.describe()} ({self.fix_total / GiB:.2f} GiB)"
        if self.tried:
            least = min(total for _, total in self.tried)
            return f"{line}; no change tried fits (least: {least / GiB:.2f} GiB): use a larger slice or more slices"
        return f"{line}; `raysft plan` with the same flags finds the smallest change that fits"

    def report(self) -> str:
        c, run, tpu = self.config, self.compiled, self.tpu
        mesh = run.programs.model.mesh
        cfg = run.programs.model.config
        lines = [
            f"{self.model_dir / 'config.json'}: {cfg.architecture}, {_count_words(self.parameters)} parameters",
            f"on {tpu.tpu_type}{f' x {tpu.num_slices} slices' if tpu.num_slices > 1 else ''}: {tpu.chips} {tpu.chip.name} "
            f"chips ({tpu.chip.hbm_bytes / GiB:.0f} GiB HBM each, {_devices(tpu.chip)}{self.hbm / GiB:.2f} GiB for "
            "one program), "
            f"{_plural(tpu.num_workers, 'host')}, topology {tpu.topology}",
            "mesh " + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
            + f"; batch {c.total_batch_size} x {c.max_sequence_length} tokens in "
            f"{_plural(c.gradient_accumulation_steps, 'micro-batch')}; {c.dtype} compute, {c.param_dtype} parameters, "
            f"{getattr(c.optimizer, 'value', c.optimizer)}",
            f"attention {run.programs.model.runtime.mechanism} (Pallas splash kernel in the step: "
            f"{ {True: 'yes', False: 'no', None: 'unknown, it did not compile'}[run.uses_splash]}); "
            f"remat {c.gradient_checkpointing}; scan_layers {c.scan_layers}",
            "",
            f"{f'per {self.unit}, GiB':<28}{'train':>9}{'eval':>9}{'export':>9}",
        ]

        def row(label, *values):
            cells = "".join(f"{'' if v is None else f'{v / GiB:.2f}':>9}" for v in values)
            lines.append(f"  {label:<26}{cells}")

        row("parameters", run.param_bytes)
        row("optimizer state", run.optimizer_bytes)
        row("batch", run.batch_bytes)
        row("gradients (temporaries)", run.gradient_bytes)
        programs = (run.train, run.eval, run.export)
        row("temporaries (activations)", *(p and p.temp for p in programs))
        row("total", *(p and p.total for p in programs))
        refused = [name for name, p in zip(("train", "eval", "export"), programs) if p and p.out_of_memory]
        if run.train.bound_only:
            lines.append("  (train: not compiled; parameters, optimizer state, batch and gradients alone are over "
                         f"the {self.unit}'s memory)")
        elif refused:
            lines.append(f"  ({', '.join(refused)}: refused by the compiler for memory; total as it reported it)")
        lines.append(f"  {'compile seconds':<26}" + "".join(f"{'' if p is None else f'{p.compile_s:.1f}':>9}" for p in programs))
        lines.append("")
        lines.append(f"{self.verdict()}" + (f", {(self.hbm - self.total) / GiB:.2f} GiB headroom" if self.fits else ""))
        if self.estimated:
            lines.append(self.estimate_line())
        return "\n".join(lines)

    def add_estimate(self) -> None:
        """The step time from the TPU compiler's cost model (two more compiles)."""
        devices = self.tpu.compile_devices()
        num_layers = self.compiled.programs.model.config.num_hidden_layers
        self.estimate = estimate_step(plan_spec(self.config, self.model_dir), devices, num_layers)
        self.estimated = True

    def estimate_line(self) -> str:
        if self.estimate is None:
            return f"estimate: none (the TPU compiler's cost model has no usable answer for {self.tpu.chip.name} programs)"
        e = self.estimate
        return (
            f"estimate (the TPU compiler's cost model, not a measurement): {e.seconds:.4g} s per step, "
            f"{e.tokens_per_second_per_device:,.0f} tokens/s per {self.unit}, MFU {self.estimated_mfu:.1%} "
            f"({e.compile_s:.0f} s to compile its 2 programs)"
        )

    @property
    def estimated_mfu(self) -> float | None:
        """The model FLOPs utilisation the estimate implies: model FLOPs per token (a
        mixture's routed experts only) of rows one document long, against the chip's bf16 peak."""
        if self.estimate is None:
            return None
        cfg = self.compiled.programs.model.config
        per_device_peak = self.tpu.chip.peak_flops / self.tpu.chip.devices_per_chip
        model = flops_per_token(cfg, self.config.max_sequence_length)
        return self.estimate.tokens_per_second_per_device * model / per_device_peak


def _devices(chip) -> str:
    return f"as {chip.devices_per_chip} devices of {chip.device_hbm_bytes / GiB:.0f} GiB, " if chip.devices_per_chip > 1 else ""


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('h') else 's'}"


def _count_words(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def plan_spec(config: SFTConfig, model_dir: Path) -> TrainSpec:
    """The TrainSpec a run of `config` would give its workers (no data, no run paths)."""
    return TrainSpec.from_config(config, model=str(model_dir))


def plan(
    config: SFTConfig,
    model: Any,
    *,
    evaluate: bool = True,
    export: bool = True,
    estimate: bool = True,
    search: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Compile `config`'s programs for its TPU slice (`tpu_type` or `accelerator_type` +
    `topology`, `num_slices`) and return the memory per chip, fit, and when asked an
    estimated step time and the smallest change that fits. `model`: a directory with a
    `config.json` (weights are not needed), that file, a hub id, or a loaded model."""
    from raysft.workers.models.source import ModelSource

    say = progress or (lambda message: None)
    tpu = config.tpu_slice
    if tpu is None:
        raise ValueError("raysft plan needs a TPU target: --tpu_type (e.g. v5p-16), or --accelerator_type with --topology")
    model_dir = (getattr(model, "source", None) or ModelSource.parse(model)).fetch(weights=False)
    hf = read_hf_config(model_dir / "config.json")
    ModelConfig.from_hf_dict(hf, source=str(model_dir / "config.json"))  # an unsupported model: one line, early
    devices = tpu.compile_devices()
    say(f"compiling for {tpu.tpu_type} ({len(devices)} devices) ...")
    layers = text_model_config(hf).get("num_hidden_layers", 0)
    if not config.scan_layers and layers > UNSCANNED_WARNING_LAYERS:
        say(f"scan_layers is false: the compiler sees all {layers} layers, which takes minutes for a deep model "
            "(scan_layers true compiles one)")
    compiled = CompiledRun.compile(plan_spec(config, model_dir), devices, with_eval=evaluate, with_export=export,
                                   hbm_bytes=tpu.chip.usable_hbm_bytes)
    parameters = sum(math.prod(s.shape) for s in compiled.programs.model.layout.shapes.values())
    result = Plan(config, model_dir, tpu, parameters, compiled)
    if estimate and result.fits:
        say("estimating the step time (2 more compiles) ...")
        result.add_estimate()
    if search and not result.fits:
        _search(result, devices, text_model_config(hf), say)
    return result


def _search(result: Plan, devices, hf: dict, say: Callable[[str], None]) -> None:
    """Compile candidate changes (train step only: eval and export need less) cheapest
    first until one fits, skipping any no stronger than one that already failed (the
    compiler refuses a program that does not fit within seconds; one that fits takes
    the full compile). If none of the first `MAX_CANDIDATES` fits, the strongest change
    of each fsdp/tp split says whether anything can."""
    config, mesh = result.config, result.compiled.programs.model.mesh
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    changes = candidate_changes(
        config, mesh.shape["dp"] * mesh.shape["fsdp"], len(devices) // config.num_slices, kv_heads
    )
    failed: list[Change] = []

    def fits(change: Change) -> bool:
        trial = config.model_copy(update=dict(change.updates))
        start = time.perf_counter()
        try:
            run = CompiledRun.compile(plan_spec(trial, result.model_dir), devices, with_eval=False, with_export=False,
                                      hbm_bytes=result.hbm)
        except ValueError as err:  # a split the model's dimensions do not allow
            say(f"  {change.describe()}: not possible ({err})")
            failed.append(change)
            return False
        total, ok = run.train.total, not run.train.out_of_memory and run.train.total <= result.hbm
        say(f"  {change.describe()}: {total / GiB:.2f} GiB, {'fits' if ok else 'does not fit'} "
            f"({time.perf_counter() - start:.0f} s)")
        result.tried.append((change, total))
        if ok:
            result.fix, result.fix_total = change, total
        else:
            failed.append(change)
        return ok

    say("searching for the smallest change that fits ...")
    tried = 0
    for change in changes:
        if tried == MAX_CANDIDATES:
            break
        if any(change.weaker_or_equal(f) for f in failed):
            continue
        tried += 1
        if fits(change):
            return
    for change in strongest(changes):
        if change not in failed and fits(change):
            return
