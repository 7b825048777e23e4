"""The training steps of one attempt: stages unfrozen when they start, checkpoints when
due or at a preemption notice, metrics every `log_steps` (the only host sync), epochs
and evals."""

from __future__ import annotations

import time

import jax
import numpy as np

from raysft.workers.checkpoints.checkpoint import Checkpoints, SavePolicy
from raysft.workers.runtime.preemption import Preempted, PreemptionNotice
from raysft.workers.training.evaluation import Evaluator
from raysft.workers.training.flops import mesh_peak_flops, model_flops
from raysft.workers.training.preference import PREFERENCE_METRICS
from raysft.workers.training.router_loss import ROUTING_METRICS
from raysft.workers.training.run_context import RunContext
from raysft.workers.training.train_state import TrainState, checkpoint_meta


class ThroughputWindow:
    """Tokens and attention pairs since the last log line, summed on device (no sync), and
    the time they took (eval time excluded)."""

    def __init__(self, run: RunContext):
        self.config = run.model.config
        self.peak, self.peak_source = mesh_peak_flops(run.model.mesh.devices.flatten().tolist(), run.spec.dtype)
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.pairs, self.steps = time.perf_counter(), 0, 0, 0

    def add(self, metrics: dict) -> None:
        self.tokens = self.tokens + metrics["tokens"]
        self.pairs = self.pairs + metrics["attention_pairs"]
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def rates(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "tokens_per_second": float(self.tokens) / elapsed,
            "step_time_s": elapsed / self.steps,
            "mfu": model_flops(self.config, float(self.tokens), float(self.pairs)) / elapsed / self.peak,
            "mfu_peak": self.peak_source,
        }


def step_record(run: RunContext, state: TrainState, step: int, metrics: dict, window: ThroughputWindow) -> dict:
    """The `step` event of a log step, from metrics already on the host."""
    return {
        "event": "step",
        "step": step,
        "epoch": step / run.steps_per_epoch,
        "loss": float(metrics["loss"]),
        "learning_rate": float(state.programs.schedule(step - 1)),
        "grad_norm": float(metrics["grad_norm"]),
        "token_accuracy": float(metrics["token_accuracy"]),
        "supervised_tokens": float(metrics["supervised_tokens"]),
        "padding_fraction": float(metrics["padding_fraction"]),
        **window.rates(),
        **{key: float(metrics[key]) for key in (*ROUTING_METRICS, *PREFERENCE_METRICS) if key in metrics},
    }


def run_steps(run: RunContext, state: TrainState, ckpts: Checkpoints, evaluate: Evaluator,
              start_step: int) -> tuple[TrainState, int, float | None]:
    """Train from `start_step` to the run's last step: (the state, the step reached, the
    last logged loss). A preemption notice saves the step all hosts agree on and raises
    `Preempted`."""
    spec, store, trainable = run.spec, run.store, run.trainable
    saves = SavePolicy(spec.save_steps, spec.save_interval_minutes, spec.log_steps)
    preemption = PreemptionNotice()
    step, last_loss = start_step, None
    attempt_start = time.perf_counter()
    window = ThroughputWindow(run)
    run.watchdog.progress("compiling and running the first step", spec.startup_timeout_s)
    while step < run.total_steps:
        if step > 0 and trainable.stage_at(step) != trainable.stage_at(step - 1):
            state = state.unfreeze(run, step)
            run.publish({"event": "unfreeze", "step": step, "trainable_parameters": trainable.trainable_count(step),
                         "total_parameters": trainable.total})
        batch = run.batch(store, store.step_rows(spec.seed, step, spec.total_batch_size), state.programs.batch_sharding)
        state.params, state.opt_state, metrics = state.programs.train_step(
            state.params, state.opt_state, batch, state.frozen, np.int32(step))
        window.add(metrics)
        step += 1
        run.watchdog.dispatched(step, metrics["loss"])
        preempted = preemption.reached(step)
        reason = "preemption" if preempted else (
            saves.due(step) or ("final" if step == run.total_steps and spec.do_last_save else None))
        if reason:
            ckpts.save(step, state.params, state.opt_state, checkpoint_meta(run, state, step, reason))
            saves.saved()
        # The step saved at a preemption is logged too: the next attempt starts after it.
        if step % spec.log_steps == 0 or step == run.total_steps or preempted:
            metrics = jax.device_get(metrics)  # the only host sync, once per log step
            last_loss = float(metrics["loss"])
            run.publish(step_record(run, state, step, metrics, window))
            window.reset()
        if preempted:
            ckpts.wait()
            run.publish({"event": "preempted", "step": step})
            raise Preempted(f"preemption notice: saved step {step} and stopped")
        if step == start_step + 1:
            # Compilation stays out of the throughput windows: the first step is timed alone
            # (one sync per attempt; a first step that is also a log step includes it).
            if window.steps:
                jax.block_until_ready(metrics["loss"])
            run.publish({"event": "first_step", "step": step, "seconds": time.perf_counter() - attempt_start})
            window.reset()
        if step % run.steps_per_epoch == 0:
            run.publish({"event": "epoch", "epoch": step // run.steps_per_epoch, "step": step,
                         "loss": float(metrics["loss"])})
        epoch_end = step % run.steps_per_epoch == 0 and step < run.total_steps
        if evaluate and (epoch_end or (spec.eval_steps and step % spec.eval_steps == 0 and step < run.total_steps)):
            run.watchdog.progress("evaluating", spec.startup_timeout_s)
            jax.block_until_ready(state.params)  # the window's steps end here: eval time is not step time
            paused = time.perf_counter()
            evaluated = evaluate(state.everything(), step)
            if evaluated:  # None with only generation prompts that have no reference
                run.publish({"event": "eval", "step": step, **evaluated})
            window.pause(time.perf_counter() - paused)
            run.watchdog.progress("training")
    preemption.close()
    return state, step, last_loss
