"""The function every host runs under Ray Train: build the mesh, restore or load, train, export."""

from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np

from raysft.workers.runtime.distributed import join_worker_group
from raysft.workers.spec import TrainSpec


def train_loop_per_worker(spec_fields: dict) -> None:
    spec = TrainSpec(**spec_fields)
    watchdog = join_worker_group(spec)
    # JAX is imported only after the distributed runtime is up (TPU hosts lock at import).
    import jax

    from raysft.data.store import RowStore
    from raysft.storage.locations import location
    from raysft.workers.checkpoints.checkpoint import Checkpoints, SavePolicy, changed_settings
    from raysft.workers.generation.eval_generation import EvalGenerations
    from raysft.workers.models.source import ModelSource
    from raysft.workers.runtime.preemption import Preempted, PreemptionNotice
    from raysft.workers.sharded_model import ShardedModel
    from raysft.workers.training.batches import global_batch
    from raysft.workers.training.flops import mesh_peak_flops, model_flops
    from raysft.workers.training.optimizer import append_stage, build_optimizer
    from raysft.workers.training.programs import RunPrograms
    from raysft.workers.training.router_loss import ROUTING_METRICS
    from raysft.workers.training.trainable import for_run

    rank0 = jax.process_index() == 0
    watchdog.progress("fetching the model to this host")
    model = ShardedModel.build(spec)
    mesh = model.mesh

    store = RowStore(spec.train_store)
    eval_stores = {name: RowStore(path) for name, path in (spec.eval_stores or {}).items()}
    batch = spec.total_batch_size
    steps_per_epoch = store.steps_per_epoch(batch)
    if steps_per_epoch == 0:
        raise ValueError(f"the training data has {store.num_rows} rows, fewer than total_batch_size {batch}")
    total_steps = spec.total_steps(steps_per_epoch)
    trainable = for_run(spec, model.layout.shapes, model.config.num_hidden_layers, steps_per_epoch)

    def publish(record: dict) -> None:
        if rank0 and spec.metrics_queue is not None:
            spec.metrics_queue.put({**record, "time": time.time()})

    watchdog.progress("loading the model or restoring the latest checkpoint")
    ckpts = Checkpoints(spec.checkpoint_dir, spec.save_total_limit)
    trajectory = spec.trajectory()
    config_hash = hashlib.sha256(json.dumps(trajectory, sort_keys=True).encode()).hexdigest()[:16]
    start_step = ckpts.latest_step()
    # `params`: what the step trains (with the optimizer state, all a checkpoint holds);
    # `frozen`: the rest of the model (LoRA's base, frozen layers), read from the model.
    # A checkpoint holds the stages of the step that made it; one that starts at the
    # resumed step is added in the loop.
    programs = RunPrograms.build(model, spec, total_steps, trainable.groups_at(max((start_step or 0) - 1, 0)))
    b_shard = programs.batch_sharding
    frozen_names = list(programs.abstract_frozen())
    if start_step is None:
        start_step = 0
        everything, param_bytes_read = model.initial_params(spec)
        params = {name: everything.pop(name) for name in programs.trained}
        frozen = everything
        opt_state = jax.jit(programs.optimizer.init, out_shardings=programs.opt_shardings)(params)
    else:
        frozen, param_bytes_read = model.initial_params(spec, frozen_names) if frozen_names else ({}, 0)
        params, opt_state, saved = ckpts.restore(
            start_step, programs.abstract_trained(), programs.abstract_opt_state(), store.fingerprint,
            spec.allow_data_change,
        )
        changes = changed_settings(saved.get("config", {}), trajectory)
        if saved["data_fingerprint"] != store.fingerprint:
            changes.append(f"data: {saved['data_fingerprint']} -> {store.fingerprint} (allow_data_change)")
        if changes:
            publish({"event": "warning", "message": f"resuming step {start_step} with changes: " + "; ".join(changes)})

    def checkpoint_meta(step: int, reason: str) -> dict:
        epoch, within = divmod(step, steps_per_epoch)
        return {
            "epoch": epoch,
            # The rows of every step are a function of (store, seed, step): this cursor and
            # the seed are the whole data-loader and RNG state (the model draws no randomness).
            "data_cursor": {"epoch": epoch, "step_in_epoch": within, "rows_consumed": step * batch},
            "rng": {"seed": spec.seed, "data_order_key": [spec.seed, epoch]},
            "data_fingerprint": store.fingerprint,
            "config_hash": config_hash,
            "config": trajectory,
            "reason": reason,
            "trained": list(programs.trained),
        }

    def unfreeze(step: int, params, opt_state, frozen):
        """The programs, parameters and optimizer state of the stage that starts at `step`:
        its parameters move from frozen to trained with a fresh optimizer state of their own."""
        groups = trainable.groups_at(step)
        new = groups[-1]
        stage_programs = RunPrograms.build(model, spec, total_steps, groups)
        params = {**params, **{name: frozen.pop(name) for name in new[1]}}
        stage_optimizer = build_optimizer(spec, total_steps, (new,))
        stage_state = jax.jit(stage_optimizer.init)({name: params[name] for name in new[1]})
        opt_state = jax.device_put(append_stage(spec, opt_state, stage_state), stage_programs.opt_shardings)
        return stage_programs, params, opt_state

    train_step, eval_step = programs.train_step, programs.eval_step
    generations = EvalGenerations.build(spec, model)

    def evaluate(params, step: int) -> dict | None:  # every parameter: trained and frozen
        """Loss, perplexity and token accuracy over every eval row of every eval source
        (one host sync), and per named source `eval_loss/<name>` and
        `eval_token_accuracy/<name>`; with eval prompts, their answers (published) and
        `exact_match`."""
        generated = {}
        if generations is not None:
            record = generations.run(params, step)
            publish(record)
            generated = {k: v for k, v in record.items() if k == "exact_match"}
        if not eval_stores:
            return generated or None
        on_device = {}
        for name, eval_store in eval_stores.items():
            sums = [eval_step(params, global_batch(eval_store, rows, b_shard)) for rows in eval_store.eval_batches(batch)]
            on_device[name] = {key: sum(s[key] for s in sums) for key in _EVAL_SUMS}
        # A list, not the dict: pytrees sort dict keys, and the sources keep the user's order.
        per_source = dict(zip(on_device, jax.device_get(list(on_device.values()))))
        overall = {key: sum(float(totals[key]) for totals in per_source.values()) for key in _EVAL_SUMS}
        result = _eval_metrics(overall)
        for name, totals in per_source.items():
            if name:
                metrics = _eval_metrics(totals)
                result[f"eval_loss/{name}"] = metrics["loss"]
                result[f"eval_token_accuracy/{name}"] = metrics["token_accuracy"]
        return {**result, **generated}

    watchdog.progress("evaluating", spec.startup_timeout_s)
    eval_start = evaluate({**frozen, **params}, start_step)
    eval_loss_start = eval_start and eval_start.get("loss")
    publish({
        "event": "start", "start_step": start_step, "total_steps": total_steps, "eval_loss": eval_loss_start,
        "exact_match": eval_start and eval_start.get("exact_match"),
        "trainable_parameters": trainable.trainable_count(start_step), "total_parameters": trainable.total,
    })

    peak, peak_source = mesh_peak_flops(mesh.devices.flatten().tolist(), spec.dtype)
    saves = SavePolicy(spec.save_steps, spec.save_interval_minutes, spec.log_steps)
    preemption = PreemptionNotice()
    step, last_loss = start_step, None
    attempt_start = time.perf_counter()
    window_start, window_tokens, window_pairs, window_steps = attempt_start, 0, 0, 0
    watchdog.progress("compiling and running the first step", spec.startup_timeout_s)
    while step < total_steps:
        if step > 0 and trainable.stage_at(step) != trainable.stage_at(step - 1):
            programs, params, opt_state = unfreeze(step, params, opt_state, frozen)
            train_step = programs.train_step
            publish({"event": "unfreeze", "step": step, "trainable_parameters": trainable.trainable_count(step),
                     "total_parameters": trainable.total})
        rows = store.step_rows(spec.seed, step, batch)
        params, opt_state, metrics = train_step(params, opt_state, global_batch(store, rows, b_shard), frozen, np.int32(step))
        window_tokens = window_tokens + metrics["tokens"]  # stays on device: no sync
        window_pairs = window_pairs + metrics["attention_pairs"]
        window_steps += 1
        step += 1
        watchdog.dispatched(step, metrics["loss"])
        preempted = preemption.reached(step)
        reason = "preemption" if preempted else (
            saves.due(step) or ("final" if step == total_steps and spec.do_last_save else None))
        if reason:
            ckpts.save(step, params, opt_state, checkpoint_meta(step, reason))
            saves.saved()
        # The step saved at a preemption is logged too: the next attempt starts after it.
        if step % spec.log_steps == 0 or step == total_steps or preempted:
            metrics = jax.device_get(metrics)  # the only host sync, once per log step
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            tokens_per_second = float(window_tokens) / elapsed
            last_loss = float(metrics["loss"])
            publish(
                {
                    "event": "step",
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "loss": last_loss,
                    "learning_rate": float(programs.schedule(step - 1)),
                    "grad_norm": float(metrics["grad_norm"]),
                    "token_accuracy": float(metrics["token_accuracy"]),
                    "supervised_tokens": float(metrics["supervised_tokens"]),
                    "padding_fraction": float(metrics["padding_fraction"]),
                    "tokens_per_second": tokens_per_second,
                    "step_time_s": elapsed / window_steps,
                    "mfu": model_flops(model.config, float(window_tokens), float(window_pairs)) / elapsed / peak,
                    "mfu_peak": peak_source,
                    **{key: float(metrics[key]) for key in ROUTING_METRICS if key in metrics},
                }
            )
            window_start, window_tokens, window_pairs, window_steps = time.perf_counter(), 0, 0, 0
        if preempted:
            ckpts.wait()
            publish({"event": "preempted", "step": step})
            raise Preempted(f"preemption notice: saved step {step} and stopped")
        if step == start_step + 1:
            # Compilation stays out of the throughput windows: the first step is timed alone
            # (one sync per attempt; a first step that is also a log step includes it).
            if window_steps:
                jax.block_until_ready(metrics["loss"])
            publish({"event": "first_step", "step": step, "seconds": time.perf_counter() - attempt_start})
            window_start, window_tokens, window_pairs, window_steps = time.perf_counter(), 0, 0, 0
        if step % steps_per_epoch == 0:
            publish({"event": "epoch", "epoch": step // steps_per_epoch, "step": step, "loss": float(metrics["loss"])})
        epoch_end = step % steps_per_epoch == 0 and step < total_steps
        if (eval_stores or generations) and (epoch_end or (spec.eval_steps and step % spec.eval_steps == 0 and step < total_steps)):
            watchdog.progress("evaluating", spec.startup_timeout_s)
            jax.block_until_ready(params)  # the window's steps end here: eval time is not step time
            paused = time.perf_counter()
            evaluated = evaluate({**frozen, **params}, step)
            if evaluated:  # None with only generation prompts that have no reference
                publish({"event": "eval", "step": step, **evaluated})
            window_start += time.perf_counter() - paused
            watchdog.progress("training")
    preemption.close()
    watchdog.progress("finishing the last checkpoint", spec.startup_timeout_s)
    ckpts.close()
    params = {**frozen, **params}
    eval_end = evaluate(params, step)
    eval_loss_end = eval_end and eval_end.get("loss")
    if eval_end:
        publish({"event": "eval", "step": step, **eval_end})

    watchdog.progress("exporting", spec.startup_timeout_s)
    model.export(params, spec.export_dir, spec.export_dtype, spec.tokenizer_dir)
    if spec.adapter_dir:
        model.export_adapter(params, spec.adapter_dir, ModelSource.parse(spec.model).name, trainable.names_at(step))
    summary = {
        "start_step": start_step,
        "final_step": step,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "train_loss": last_loss,
        "eval_loss_start": eval_loss_start,
        "eval_loss_end": eval_loss_end,
        "eval_end": eval_end,
        "eval_exact_match_start": eval_start and eval_start.get("exact_match"),
        "eval_exact_match_end": eval_end and eval_end.get("exact_match"),
        "process_count": jax.process_count(),
        "mesh_devices": int(mesh.devices.size),
        "mesh_shape": dict(mesh.shape),
        "attn_mechanism": model.runtime.mechanism,
        "param_bytes_read_by_rank0": param_bytes_read,
        "data_fingerprint": store.fingerprint,
        "export_dir": spec.export_dir,
        "adapter_dir": spec.adapter_dir,
        "trainable_parameters": trainable.trainable_count(step),
        "total_parameters": trainable.total,
        "checkpoint_dir": spec.checkpoint_dir,
        "spec": {k: v for k, v in spec.as_dict().items() if k != "metrics_queue"},
    }
    if rank0:
        location(spec.summary_file).write_text(json.dumps(summary, indent=2))
    watchdog.close()
    publish({"event": "end", **{k: v for k, v in summary.items() if k != "spec"}})


_EVAL_SUMS = ("loss_sum", "weight_sum", "correct")


def _eval_metrics(totals: dict) -> dict[str, float]:
    loss = float(totals["loss_sum"]) / max(float(totals["weight_sum"]), 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "token_accuracy": float(totals["correct"]) / max(float(totals["weight_sum"]), 1.0)}
