"""What every phase of a host's training run reads: its spec, model, data, trainable stages
and step counts, and where its records go."""

from __future__ import annotations

import dataclasses
import time

import jax

from raysft.data.store import RowStore
from raysft.workers.runtime.watchdog import Watchdog
from raysft.workers.sharded_model import ShardedModel
from raysft.workers.spec import TrainSpec
from raysft.workers.training.batches import global_batch
from raysft.workers.training.trainable import TrainableSet, for_run


@dataclasses.dataclass(frozen=True)
class RunContext:
    spec: TrainSpec
    model: ShardedModel
    store: RowStore
    eval_stores: dict[str, RowStore]  # name ("" for an unnamed eval_dataset) -> rows, in the user's order
    trainable: TrainableSet
    steps_per_epoch: int
    total_steps: int
    watchdog: Watchdog
    # A preference run's reference log-probabilities by store path (`references`), once computed.
    references: dict = dataclasses.field(default_factory=dict)

    def batch(self, store: RowStore, rows, sharding) -> dict:
        """The global batch of `rows` of `store`, with its reference log-probabilities if any."""
        return global_batch(store, rows, sharding, self.references.get(str(store.path)))

    @classmethod
    def open(cls, spec: TrainSpec, watchdog: Watchdog) -> "RunContext":
        watchdog.progress("fetching the model to this host")
        model = ShardedModel.build(spec)
        store = RowStore(spec.train_store)
        steps_per_epoch = store.steps_per_epoch(spec.total_batch_size)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training data has {store.num_rows} rows, fewer than total_batch_size {spec.total_batch_size}"
            )
        return cls(
            spec, model, store, {name: RowStore(path) for name, path in (spec.eval_stores or {}).items()},
            for_run(spec, model.layout.shapes, model.config.num_hidden_layers, steps_per_epoch), steps_per_epoch,
            spec.total_steps(steps_per_epoch), watchdog,
        )

    def publish(self, record: dict) -> None:
        """A record for the driver's progress bar, metrics file and wandb (host 0's only)."""
        if jax.process_index() == 0 and self.spec.metrics_queue is not None:
            self.spec.metrics_queue.put({**record, "time": time.time()})
