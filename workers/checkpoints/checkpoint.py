"""Orbax checkpoints of the training state, saved asynchronously and committed atomically.

Orbax writes each step into a temporary directory and renames it when every host has
finished (on object storage: writes a commit file last), so a save killed midway leaves
no step behind and `latest_step` is always a complete one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from raysft.storage.locations import is_object_storage
from raysft.workers.checkpoints.object_checkpoints import enable_s3, object_storage_options


class ResumeMismatch(ValueError):
    """A checkpoint that was trained on other data than this run prepares."""


class SavePolicy:
    """When to save: every `save_steps`, and once `save_interval_minutes` passed.

    Every host must save the same steps, so the clock is read on host 0 and its answer
    broadcast, at log steps only (where the loop syncs anyway).
    """

    def __init__(self, save_steps: int | None, save_interval_minutes: float | None, log_steps: int):
        self.save_steps = save_steps
        self.interval_s = save_interval_minutes * 60 if save_interval_minutes else None
        self.log_steps = log_steps
        self.last_save = time.monotonic()

    def due(self, step: int) -> str | None:
        """Why `step` is saved ("steps" or "interval"), or None."""
        if self.save_steps and step % self.save_steps == 0:
            return "steps"
        if self.interval_s and step % self.log_steps == 0:
            from jax.experimental import multihost_utils

            elapsed = np.int32(time.monotonic() - self.last_save >= self.interval_s)
            if int(multihost_utils.broadcast_one_to_all(elapsed)):
                return "interval"
        return None

    def saved(self) -> None:
        self.last_save = time.monotonic()


class Checkpoints:
    """The trained parameters and their optimizer state per step, with the run's metadata
    next to them (`meta["trained"]`: the names of the parameters saved; a frozen base is
    not, it is read from the model again)."""

    def __init__(self, directory: str | Path, keep: int | None):
        atomicity = None
        if is_object_storage(directory):
            enable_s3()
            atomicity = object_storage_options()
        else:
            directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                create=True,
                atomicity_options=atomicity,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Start an async save: training goes on while it is written (the previous save
        is finished first). The step becomes visible only once complete on every host."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave(dict(meta, step=step, saved_at=time.time())),
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def refuse_other_data(self, step: int, data_fingerprint: str, allow_data_change: bool) -> dict[str, Any]:
        """The meta of `step`, unless that step was trained on other data than `data_fingerprint`."""
        meta = self.meta(step)
        if meta["data_fingerprint"] != data_fingerprint and not allow_data_change:
            raise ResumeMismatch(
                f"checkpoint step {step} in {self.manager.directory} was trained on data "
                f"{meta['data_fingerprint']}, this run prepared {data_fingerprint}; set allow_data_change=True "
                "to continue on the new data, or use a new model_name or save_directory to start over"
            )
        return meta

    def restore(
        self, step: int, abstract_params, abstract_opt_state, data_fingerprint: str, allow_data_change: bool = False
    ) -> tuple[Any, Any, dict[str, Any]]:
        """(params, opt_state, meta) of `step`; refused if it was trained on other data."""
        meta = self.refuse_other_data(step, data_fingerprint, allow_data_change)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
            ),
        )
        return restored.state["params"], restored.state["opt_state"], meta

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Only the parameters of `step` (an export needs no optimizer state, which is
        twice their size under AdamW): those it trained (`meta["trained"]`), of
        `abstract_params` by name."""
        trained = self.meta(step).get("trained")
        if trained is not None:
            abstract_params = {name: abstract_params[name] for name in trained}
        target = {"params": abstract_params}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                )
            ),
        )
        return restored.state["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`name: old -> new` for each setting that shapes the trajectory and differs."""
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]

