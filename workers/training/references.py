"""The reference model's log-probabilities of a preference run's rows: computed once, before
training, by a sharded pass of the run's own model over every row of each row store (with
LoRA, the base with the adapters off: no second model in device memory, ever), and stored
beside the rows under a key of the reference model, so a resumed run, or another run on the
same data and model, reads them instead.

Stored as `reference/<model key>/batch.<i>.npy` [B, T] float32 in the store (rows in order,
B per file), with `meta.json` written last: a pass cut short is done again."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from raysft.data.store import RowStore
from raysft.storage.locations import load_array, local_copy, location, make_dir, save_array
from raysft.workers.models.lora import is_adapter
from raysft.workers.spec import TrainSpec
from raysft.workers.training.batches import global_batch
from raysft.workers.training.step import microbatches

META = "meta.json"


def reference_key(spec: TrainSpec) -> str:
    """What the reference's log-probabilities depend on besides the rows: the model (pinned),
    how it computes, and the base's quantization."""
    identity = [spec.model, spec.dtype, spec.param_dtype, spec.quantize_base, spec.quantization_block_size,
                spec.attn_mechanism]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


class ReferenceLogps:
    """One store's reference log-probabilities, read by row like the store's own fields."""

    def __init__(self, path):
        self.path = location(path)
        self.meta = json.loads((self.path / META).read_text())
        self.rows_per_file: int = self.meta["rows_per_file"]
        self._files: dict[int, np.ndarray] = {}

    @staticmethod
    def exists(path) -> bool:
        return (location(path) / META).is_file()

    def _file(self, i: int) -> np.ndarray:
        if i not in self._files:
            self._files[i] = load_array(local_copy(self.path) / f"batch.{i:06d}.npy")
        return self._files[i]

    def read(self, row_indices: np.ndarray, seq_len: int) -> np.ndarray:
        """[len(row_indices), seq_len]; an index of -1 (an empty row) reads zeros."""
        out = np.zeros((len(row_indices), seq_len), np.float32)
        for k, row in enumerate(np.asarray(row_indices, np.int64)):
            if row >= 0:
                out[k] = self._file(int(row) // self.rows_per_file)[int(row) % self.rows_per_file]
        return out


def reference_params(params: dict) -> dict:
    """The reference model in the run's own parameters: LoRA's adapters turned off (zero
    adapters add nothing), so the reference is the base, whatever adapter the run starts from."""
    return {name: jnp.zeros_like(p) if is_adapter(name) else p for name, p in params.items()}


def reference_dir(store: RowStore, spec: TrainSpec):
    return store.path / "reference" / reference_key(spec)


def compute_references(spec: TrainSpec, model, programs, stores: list[RowStore], initial_params,
                       report=None) -> dict[str, ReferenceLogps]:
    """Each store's `ReferenceLogps` (by store path), computed where missing from
    `initial_params()` (the model as the run starts; adapters are turned off). Every host takes part: the
    rows are sharded over the mesh as in training, and host 0 writes each batch."""
    objective, sharding, batch_size = programs.objective, programs.batch_sharding, spec.total_batch_size
    steps = spec.gradient_accumulation_steps

    def logps(params, batch):  # in training's micro-batches: never more activations than a step
        micro = microbatches(batch, steps, sharding)
        out = jax.lax.map(lambda b: objective.reference_log_probs(model.layout.bind(params), b), micro)
        return out.swapaxes(0, 1).reshape(batch["input_ids"].shape)

    compiled = None
    found = {}
    for store in stores:
        where = reference_dir(store, spec)
        if not ReferenceLogps.exists(where):
            if report:
                report(f"computing the reference log-probabilities of {store.num_rows} rows ({store.path})")
            if jax.process_index() == 0:
                make_dir(where)
            if compiled is None:
                compiled = jax.jit(logps, in_shardings=(model.shardings, sharding), out_shardings=sharding)
                reference = reference_params(initial_params())
            for i, rows in enumerate(store.eval_batches(batch_size)):
                values = compiled(reference, global_batch(store, rows, sharding))
                values = np.asarray(multihost_utils.process_allgather(values, tiled=True))
                if jax.process_index() == 0:
                    save_array(where / f"batch.{i:06d}.npy", values)
            multihost_utils.sync_global_devices(f"reference {where}")
            if jax.process_index() == 0:
                (where / META).write_text(json.dumps({"rows_per_file": batch_size, "rows": store.num_rows,
                                                      "key": reference_key(spec)}))
            multihost_utils.sync_global_devices(f"reference meta {where}")
        found[str(store.path)] = ReferenceLogps(where)
    return found
