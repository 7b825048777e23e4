"""The end of a run on each host: the last checkpoint, the final eval, the export (and the
PEFT adapter), and the summary the driver reads."""

from __future__ import annotations

import json

import jax

from raysft.storage.locations import location
from raysft.workers.checkpoints.checkpoint import Checkpoints
from raysft.workers.models.source import ModelSource
from raysft.workers.training.evaluation import Evaluator
from raysft.workers.training.run_context import RunContext
from raysft.workers.training.train_state import TrainState


def finish(run: RunContext, state: TrainState, ckpts: Checkpoints, evaluate: Evaluator, *, start_step: int,
           eval_start: dict | None, param_bytes_read: int, step: int, last_loss: float | None) -> None:
    """After the last step (`step`): what the attempt began from goes into the summary too."""
    spec, model, trainable = run.spec, run.model, run.trainable
    run.watchdog.progress("finishing the last checkpoint", spec.startup_timeout_s)
    ckpts.close()
    params = state.everything()
    eval_end = evaluate(params, step)
    if eval_end:
        run.publish({"event": "eval", "step": step, **eval_end})

    run.watchdog.progress("exporting", spec.startup_timeout_s)
    model.export(params, spec.export_dir, spec.export_dtype, spec.tokenizer_dir)
    if spec.adapter_dir:
        model.export_adapter(params, spec.adapter_dir, ModelSource.parse(spec.model).name, trainable.names_at(step))
    summary = {
        "start_step": start_step,
        "final_step": step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "train_loss": last_loss,
        "eval_loss_start": eval_start and eval_start.get("loss"),
        "eval_loss_end": eval_end and eval_end.get("loss"),
        "eval_start": eval_start,
        "eval_end": eval_end,
        "eval_exact_match_start": eval_start and eval_start.get("exact_match"),
        "eval_exact_match_end": eval_end and eval_end.get("exact_match"),
        "process_count": jax.process_count(),
        "mesh_devices": int(model.mesh.devices.size),
        "mesh_shape": dict(model.mesh.shape),
        "attn_mechanism": model.runtime.mechanism,
        "param_bytes_read_by_rank0": param_bytes_read,
        "data_fingerprint": run.store.fingerprint,
        "export_dir": spec.export_dir,
        "adapter_dir": spec.adapter_dir,
        "trainable_parameters": trainable.trainable_count(step),
        "total_parameters": trainable.total,
        "checkpoint_dir": spec.checkpoint_dir,
        "spec": {k: v for k, v in spec.as_dict().items() if k != "metrics_queue"},
    }
    if jax.process_index() == 0:
        location(spec.summary_file).write_text(json.dumps(summary, indent=2))
    run.watchdog.close()
    run.publish({"event": "end", **{k: v for k, v in summary.items() if k != "spec"}})
