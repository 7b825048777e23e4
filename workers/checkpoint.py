"""Orbax checkpoints of the training state, saved asynchronously and committed atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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

    def restore(self, step: int, abstract_params, abstract_opt_state) -> tuple[Any, Any, dict[str, Any]]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state["params"], restored.state["opt_state"], restored.meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs with shardings: where orbax should restore each array to."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
