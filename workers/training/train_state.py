"""What a step updates, and where it comes from: the trained parameters and their
optimizer state, restored from the latest checkpoint or initialised from the model; the
frozen rest of the model; the compiled programs of the current trainable stage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax

from raysft.workers.checkpoints.checkpoint import Checkpoints, changed_settings
from raysft.workers.training.optimizer import append_stage, build_optimizer
from raysft.workers.training.programs import RunPrograms
from raysft.workers.training.run_context import RunContext


@dataclasses.dataclass
class TrainState:
    programs: RunPrograms  # the current stage's: a stage that unfreezes layers builds its own
    # `params`: what the step trains (with the optimizer state, all a checkpoint holds);
    # `frozen`: the rest of the model (LoRA's base, frozen layers), read from the model.
    params: dict[str, jax.Array]
    opt_state: Any
    frozen: dict[str, jax.Array]

    def everything(self) -> dict[str, jax.Array]:
        return {**self.frozen, **self.params}

    def unfreeze(self, run: RunContext, step: int) -> "TrainState":
        """The stage that starts at `step`: its parameters move from frozen to trained,
        with a fresh optimizer state of their own."""
        groups = run.trainable.groups_at(step)
        new = groups[-1]
        programs = RunPrograms.build(run.model, run.spec, run.total_steps, groups)
        frozen = dict(self.frozen)
        params = {**self.params, **{name: frozen.pop(name) for name in new[1]}}
        stage_optimizer = build_optimizer(run.spec, run.total_steps, (new,))
        stage_state = jax.jit(stage_optimizer.init)({name: params[name] for name in new[1]})
        opt_state = jax.device_put(append_stage(run.spec, self.opt_state, stage_state), programs.opt_shardings)
        return TrainState(programs, params, opt_state, frozen)


def restore_or_init(run: RunContext, ckpts: Checkpoints) -> tuple[TrainState, int, int]:
    """(the state to train from, its step, the parameter bytes this host read). A
    checkpoint holds the stages of the step that made it; one that starts at the resumed
    step is added by the step loop."""
    spec, model = run.spec, run.model
    start_step = ckpts.latest_step()
    programs = RunPrograms.build(model, spec, run.total_steps, run.trainable.groups_at(max((start_step or 0) - 1, 0)))
    if start_step is None:
        everything, param_bytes_read = model.initial_params(spec)
        params = {name: everything.pop(name) for name in programs.trained}
        opt_state = jax.jit(programs.optimizer.init, out_shardings=programs.opt_shardings)(params)
        return TrainState(programs, params, opt_state, everything), 0, param_bytes_read
    frozen_names = list(programs.abstract_frozen())
    frozen, param_bytes_read = model.initial_params(spec, frozen_names) if frozen_names else ({}, 0)
    params, opt_state, saved = ckpts.restore(
        start_step, programs.abstract_trained(), programs.abstract_opt_state(), run.store.fingerprint,
        spec.allow_data_change,
    )
    changes = changed_settings(saved.get("config", {}), spec.trajectory())
    if saved["data_fingerprint"] != run.store.fingerprint:
        changes.append(f"data: {saved['data_fingerprint']} -> {run.store.fingerprint} (allow_data_change)")
    if changes:
        run.publish({"event": "warning", "message": f"resuming step {start_step} with changes: " + "; ".join(changes)})
    return TrainState(programs, params, opt_state, frozen), start_step, param_bytes_read


def checkpoint_meta(run: RunContext, state: TrainState, step: int, reason: str) -> dict:
    """What a checkpoint records beside the arrays: where the data stood, the settings the
    run's trajectory depends on, and why it was saved."""
    trajectory = run.spec.trajectory()
    epoch, within = divmod(step, run.steps_per_epoch)
    return {
        "epoch": epoch,
        # The rows of every step are a function of (store, seed, step): this cursor and
        # the seed are the whole data-loader and RNG state (the model draws no randomness).
        "data_cursor": {"epoch": epoch, "step_in_epoch": within, "rows_consumed": step * run.spec.total_batch_size},
        "rng": {"seed": run.spec.seed, "data_order_key": [run.spec.seed, epoch]},
        "data_fingerprint": run.store.fingerprint,
        "config_hash": hashlib.sha256(json.dumps(trajectory, sort_keys=True).encode()).hexdigest()[:16],
        "config": trajectory,
        "reason": reason,
        "trained": list(state.programs.trained),
    }
