"""Export any checkpoint of a run directory in the Hugging Face layout (`raysft export`)."""

from __future__ import annotations

import os

from etils import epath

from raysft.orchestrator.cluster import connect
from raysft.orchestrator.config_groups import DType
from raysft.orchestrator.node_checks import check_every_node
from raysft.orchestrator.restarts import classify
from raysft.orchestrator.run_record import RunRecord
from raysft.orchestrator.worker_group import worker_group
from raysft.storage.locations import location
from raysft.storage.shared_storage import write_marker
from raysft.workers.checkpoints.export_loop import export_loop_per_worker
from raysft.workers.spec import TrainSpec


class ExportFailed(RuntimeError):
    """The export workers failed; the message carries the workers' own error."""


def checkpoint_steps(run_dir: epath.Path) -> list[int]:
    """Complete checkpoints of a run (orbax lists a step only once it is committed)."""
    from raysft.workers.checkpoints.checkpoint import Checkpoints

    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    checkpoints = Checkpoints(str(directory), keep=None)
    try:
        return sorted(checkpoints.manager.all_steps())
    finally:
        checkpoints.close()


def complete_step(run_dir: epath.Path, step: int | None) -> int:
    """Checkpoint `step` of a run (default: the latest), which must be complete."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir / 'checkpoints'} holds no complete checkpoint; set save_steps or do_last_save")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run_dir / 'checkpoints'} has no step {step}; complete steps: {', '.join(map(str, steps))}")
    return step


def export_checkpoint(
    run_dir: str | os.PathLike,
    step: int | None = None,
    output_dir: str | os.PathLike | None = None,
    export_dtype: DType | None = None,
    adapter_only: bool = False,
) -> epath.Path:
    """Write checkpoint `step` (default: the latest) of `run_dir` as safetensors, config,
    generation config and tokenizer files to `output_dir` (default `run_dir/export-step-N`),
    a LoRA run's adapters merged in; with `adapter_only`, the adapters as a PEFT adapter
    directory (default `run_dir/adapter-step-N`).

    Runs on the run's own worker group (the same hosts, mesh and shardings as training),
    so a model too large for one host exports as it trained."""
    from ray.train import TrainingFailedError

    run_dir = location(run_dir)
    record = RunRecord.read(run_dir)
    config = record.config
    if adapter_only and not config.use_lora:
        raise ValueError(f"{run_dir} trained without LoRA (use_lora false): it has no adapter to export")
    step = complete_step(run_dir, step)
    output = location(output_dir) if output_dir else run_dir / f"{'adapter' if adapter_only else 'export'}-step-{step}"
    if export_dtype:
        config = config.model_copy(update={"export_dtype": export_dtype})
    connect(config.hosts)
    marker = write_marker(run_dir)
    check_every_node(marker, str(record.model))
    spec = TrainSpec.from_config(
        config,
        model=str(record.model),
        tokenizer_dir=str(run_dir / "tokenizer"),
        checkpoint_dir=str(run_dir / "checkpoints"),
        export_dir=str(output),
        storage_marker=marker,
    )
    group = worker_group(
        config, export_loop_per_worker, {"spec": spec.as_dict(), "step": step, "adapter_only": adapter_only}, run_dir,
        "export",
    )
    try:
        group.fit()
    except TrainingFailedError as err:
        failure = classify(err)
        if failure.kind == "input":
            raise ValueError(failure.message) from err
        raise ExportFailed(failure.message) from err
    return output
