"""The function every host runs to export one checkpoint in the Hugging Face layout."""

from __future__ import annotations

from raysft.workers.runtime.distributed import join_worker_group
from raysft.workers.spec import TrainSpec


def export_loop_per_worker(config: dict) -> None:
    """`config`: {"spec": the run's TrainSpec fields, "step": the checkpoint to export,
    "adapter_only": LoRA's adapter as a PEFT directory instead of the merged model}.
    Each host restores only its own shards of the parameters and takes part in the
    file-by-file gather that host 0 writes, as at the end of training."""
    spec, step = TrainSpec(**config["spec"]), config["step"]
    watchdog = join_worker_group(spec)
    from raysft.workers.checkpoints.checkpoint import Checkpoints
    from raysft.workers.models.source import ModelSource
    from raysft.workers.sharded_model import ShardedModel
    from raysft.workers.training.trainable import for_run

    watchdog.progress("fetching the model to this host")
    model = ShardedModel.build(spec)
    watchdog.progress(f"restoring checkpoint step {step}", spec.startup_timeout_s)
    checkpoints = Checkpoints(spec.checkpoint_dir, keep=None)
    params = model.checkpoint_params(checkpoints, step, spec)
    checkpoints.close()
    watchdog.progress("exporting")
    if config.get("adapter_only"):
        trainable = for_run(spec, model.layout.shapes, model.config.num_hidden_layers, steps_per_epoch=1)
        trained = [name for _, names in trainable.stages for name in names]  # a LoRA run has one stage
        model.export_adapter(params, spec.export_dir, ModelSource.parse(spec.model).name, trained)
    else:
        model.export(params, spec.export_dir, spec.export_dtype, spec.tokenizer_dir)
    watchdog.close()
