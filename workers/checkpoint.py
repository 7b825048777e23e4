"""Orbax checkpoints of the training state, saved asynchronously and committed atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class ResumeMismatch(ValueError):
    """A checkpoint that was trained on other data than this run prepares."""


class Checkpoints:
    """Params, optimizer state and run metadata (step, data fingerprint) per step."""

    def __init__(self, directory: str | Path, save_steps: int | None, keep: int | None):
        self.save_steps = save_steps
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=True,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return bool(self.save_steps) and step % self.save_steps == 0

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Start an async save; the previous one is finished first (orbax orders them)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave(dict(meta, step=step)),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_params, abstract_opt_state, data_fingerprint: str) -> tuple[Any, Any]:
        """(params, opt_state) of `step`, refused if it was trained on other data."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta["data_fingerprint"] != data_fingerprint:
            raise ResumeMismatch(
                f"checkpoint step {step} in {self.manager.directory} was trained on data "
                f"{meta['data_fingerprint']}, this run prepared {data_fingerprint}; "
                "use a new model_name or save_directory to start over"
            )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
            ),
        )
        return restored.state["params"], restored.state["opt_state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs with shardings: where orbax should restore each array to."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
