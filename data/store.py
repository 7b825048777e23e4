"""Step-indexed store of prepared rows, so any host can read any step's batch directly.

Rows are written once, as shards of consecutive rows (`.npy` arrays [n, T] per field,
each written by its own task); the order for epoch `e` is a permutation
drawn from `(seed, e)`, so the rows of global step `s` are a pure function of the store,
the seed and `s`. A restarted run reads the exact next batch without replaying anything.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from etils import epath

from raysft.data.rows import ROW_FIELDS
from raysft.storage.locations import local_copy, location

META_FILE = "meta.json"


def shard_file(store_dir: Path | epath.Path, name: str, index: int) -> Path | epath.Path:
    return store_dir / f"{name}.{index:05d}.npy"


class RowStore:
    """`path`: a local directory or an object-storage prefix; a host reads the rows from
    its own copy of the latter, fetched on the first read (the driver reads only the meta)."""

    def __init__(self, path: str | os.PathLike):
        self.path = location(path)
        self.meta = json.loads((self.path / META_FILE).read_text())
        self.num_rows: int = self.meta["num_rows"]
        self.seq_len: int = self.meta["seq_len"]
        self.fingerprint: str = self.meta["fingerprint"]
        self._starts = np.cumsum([0] + self.meta["shard_rows"])
        self._order_key: tuple[int, int] | None = None
        self._order = np.empty(0, np.int64)

    @functools.cached_property
    def _shards(self) -> list[dict[str, np.ndarray]]:
        local = local_copy(self.path)
        return [
            {name: np.load(shard_file(local, name, i), mmap_mode="r") for name in ROW_FIELDS}
            for i in range(len(self.meta["shard_rows"]))
        ]

    @staticmethod
    def exists(path: epath.Path) -> bool:
        return (path / META_FILE).is_file()

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_rows // global_batch

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        # Drawn once per epoch, not per step: O(rows) work off the step's hot path.
        if self._order_key != (seed, epoch):
            self._order = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
            self._order_key = (seed, epoch)
        return self._order

    def step_rows(self, seed: int, step: int, global_batch: int) -> np.ndarray:
        """Row indices [global_batch] of global training step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch(global_batch))
        return self.epoch_order(seed, epoch)[within * global_batch : (within + 1) * global_batch]

    def read(self, row_indices: np.ndarray, columns: slice = slice(None)) -> dict[str, np.ndarray]:
        """Rows by index; an index of -1 yields an empty row (all padding, zero weight)."""
        row_indices = np.asarray(row_indices, np.int64)
        shard = np.searchsorted(self._starts, row_indices, side="right") - 1
        out = {}
        for name, dtype in ROW_FIELDS.items():
            block = np.zeros((len(row_indices), self.seq_len), dtype)[:, columns]
            for s in np.unique(shard[row_indices >= 0]):
                at = (shard == s) & (row_indices >= 0)
                block[at] = self._shards[s][name][row_indices[at] - self._starts[s]][:, columns]
            out[name] = block
        return out

    def eval_batches(self, global_batch: int) -> list[np.ndarray]:
        """Every row once, in order, the last batch filled with empty rows."""
        padded = -np.ones(-(-self.num_rows // global_batch) * global_batch, np.int64)
        padded[: self.num_rows] = np.arange(self.num_rows)
        return list(padded.reshape(-1, global_batch))
