"""The jitted programs of a run: train step, eval step and export gather.

Built once from the run's model and settings. Training calls them on real arrays;
`raysft plan` lowers the very same functions with abstract arguments and compiles them
for a TPU slice that is not attached, so what it measures is what training runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import NamedSharding

from raysft.data.rows import ROW_FIELDS
from raysft.workers.models.export import layer_gather
from raysft.workers.models.lora import is_adapter
from raysft.workers.runtime.mesh import ShardingError, batch_sharding, optimizer_state_shardings
from raysft.workers.sharded_model import ShardedModel
from raysft.workers.spec import TrainSpec
from raysft.workers.training.objective import SFT, Objective
from raysft.workers.training.optimizer import build_optimizer, learning_rate_schedule
from raysft.workers.training.preference import Preference, PreferenceSettings
from raysft.workers.training.step import make_eval_step, make_train_step


def run_objective(spec: TrainSpec, model: ShardedModel) -> Objective:
    """The run's objective: SFT, or a preference objective (`spec.preference`)."""
    aux = model.config.router_aux_loss_coef if spec.router_aux_loss_coef is None else spec.router_aux_loss_coef
    router = (aux, spec.router_z_loss_coef)
    if spec.preference is not None:
        return Preference(PreferenceSettings(**spec.preference), spec.loss_chunk_size, router)
    return SFT(spec.loss_chunk_size, spec.z_loss, router)


@dataclasses.dataclass(frozen=True)
class RunPrograms:
    model: ShardedModel
    trained: tuple[str, ...]  # the parameters the train step differentiates and updates
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    batch_sharding: NamedSharding
    opt_shardings: Any
    train_step: Callable  # (params, opt_state, batch, frozen, step) -> (params, opt_state, metrics)
    eval_step: Callable  # (all params, batch) -> sums
    objective: Objective

    @classmethod
    def build(
        cls, model: ShardedModel, spec: TrainSpec, total_steps: int,
        groups: tuple[tuple[int, tuple[str, ...]], ...] | None = None,
    ) -> "RunPrograms":
        """Checks that the batch and rows divide over the mesh, then builds the programs.
        `groups`: the stages of `workers.training.trainable` started so far (default: one stage of
        every parameter)."""
        mesh = model.mesh
        batch, accumulation = spec.total_batch_size, spec.gradient_accumulation_steps
        batch_devices = mesh.shape["dp"] * mesh.shape["fsdp"]
        if batch % (batch_devices * accumulation):
            raise ValueError(
                f"total_batch_size {batch} is not divisible by gradient_accumulation_steps {accumulation} x "
                f"the {batch_devices} data-parallel devices"
            )
        if spec.max_sequence_length % mesh.shape["sp"]:
            raise ShardingError(
                f"max_sequence_length {spec.max_sequence_length} is not divisible by sp={mesh.shape['sp']}"
            )
        groups = groups or ((0, tuple(model.layout.names)),)
        trained = tuple(name for _, names in groups for name in names)
        optimizer = build_optimizer(spec, total_steps, groups)
        trained_shardings = {name: model.shardings[name] for name in trained}
        frozen_shardings = {name: s for name, s in model.shardings.items() if name not in trained_shardings}
        abstract_opt = jax.eval_shape(optimizer.init, {n: model.layout.shapes[n] for n in trained})
        opt_shardings = optimizer_state_shardings(abstract_opt, model.layout.shapes, model.shardings, mesh)
        rows = batch_sharding(mesh)
        objective = run_objective(spec, model)
        train_step = make_train_step(
            model.layout, optimizer, (trained_shardings, opt_shardings), gradient_accumulation_steps=accumulation,
            batch_sharding=rows, frozen_sharding=frozen_shardings,
            dropout_seed=spec.seed if model.lora and model.lora.dropout else None, objective=objective,
        )
        eval_step = make_eval_step(model.layout, gradient_accumulation_steps=accumulation, batch_sharding=rows,
                                   params_sharding=model.shardings, objective=objective)
        return cls(
            model, trained, optimizer, learning_rate_schedule(spec, total_steps), rows, opt_shardings, train_step,
            eval_step, objective,
        )

    def abstract_trained(self) -> dict[str, jax.ShapeDtypeStruct]:
        abstract = self.model.abstract_params()
        return {name: abstract[name] for name in self.trained}

    def abstract_frozen(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {name: a for name, a in self.model.abstract_params().items() if name not in self.trained}

    def abstract_opt_state(self):
        """Shapes, dtypes and shardings of the optimizer state (what orbax restores into)."""
        abstract = jax.eval_shape(self.optimizer.init, self.abstract_trained())
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.opt_shardings
        )

    def abstract_batch(self, rows: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            name: jax.ShapeDtypeStruct((rows, seq_len), dtype, sharding=self.batch_sharding)
            for name, dtype in {**ROW_FIELDS, **self.objective.fields}.items()
        }

    def export_gathers(self, dtype: str) -> dict[str, tuple[Callable, tuple]]:
        """The export's gather program for each parameter, with abstract arguments: one
        layer of a stacked parameter (or the whole of another) onto every device."""
        return {
            name: layer_gather(name, abstract, dtype)
            for name, abstract in self.model.abstract_params().items()
            if not is_adapter(name)  # merged into their kernels
        }
