"""The function every host runs under Ray Train: join the worker group, restore or load,
train, export. Each phase is a module of its own: `run_context` (model, data, stages),
`train_state` (restore or initialise, unfreeze), `references` (a preference run's reference
log-probabilities), `evaluation`, `step_loop`, `finish`."""

from __future__ import annotations

from raysft.workers.runtime.distributed import join_worker_group
from raysft.workers.spec import TrainSpec


def train_loop_per_worker(spec_fields: dict) -> None:
    spec = TrainSpec(**spec_fields)
    watchdog = join_worker_group(spec)
    # JAX is imported only after the distributed runtime is up (TPU hosts lock at import).
    from raysft.workers.checkpoints.checkpoint import Checkpoints
    from raysft.workers.training.evaluation import Evaluator
    from raysft.workers.training.finish import finish
    from raysft.workers.training.references import compute_references
    from raysft.workers.training.run_context import RunContext
    from raysft.workers.training.step_loop import run_steps
    from raysft.workers.training.train_state import restore_or_init

    run = RunContext.open(spec, watchdog)
    watchdog.progress("loading the model or restoring the latest checkpoint")
    ckpts = Checkpoints(spec.checkpoint_dir, spec.save_total_limit)
    state, start_step, param_bytes_read = restore_or_init(run, ckpts)
    if state.programs.objective.fields:
        watchdog.progress("computing the reference log-probabilities", spec.startup_timeout_s)
        run.references.update(compute_references(
            spec, run.model, state.programs, [run.store, *run.eval_stores.values()],
            lambda: state.everything() if start_step == 0 else run.model.initial_params(spec)[0],
            lambda message: run.publish({"event": "note", "message": message})))
    evaluate = Evaluator(run, state.programs)

    watchdog.progress("evaluating", spec.startup_timeout_s)
    eval_start = evaluate(state.everything(), start_step)
    run.publish({
        "event": "start", "start_step": start_step, "total_steps": run.total_steps,
        "eval_loss": eval_start and eval_start.get("loss"), "exact_match": eval_start and eval_start.get("exact_match"),
        "trainable_parameters": run.trainable.trainable_count(start_step), "total_parameters": run.trainable.total,
    })
    state, step, last_loss = run_steps(run, state, ckpts, evaluate, start_step)
    finish(run, state, ckpts, evaluate, start_step=start_step, eval_start=eval_start, param_bytes_read=param_bytes_read,
           step=step, last_loss=last_loss)
