"""Step-indexed store of prepared rows, so any host can read any step's batch directly.

Rows are written once as `.npy` arrays [N, T]; the order for epoch `e` is a permutation
drawn from `(seed, e)`, so the rows of global step `s` are a pure function of the store,
the seed and `s`. A restarted run reads the exact next batch without replaying anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from raysft.data.rows import ROW_FIELDS

META_FILE = "meta.json"


def write_store(out_dir: Path, rows: dict[str, np.ndarray], meta: dict) -> Path:
    """Write rows atomically: readers never see a half-written store."""
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ROW_FIELDS:
        np.save(tmp / f"{name}.npy", rows[name])
    num_rows, seq_len = rows["input_ids"].shape
    (tmp / META_FILE).write_text(json.dumps(dict(meta, num_rows=num_rows, seq_len=seq_len), indent=2))
    if out_dir.exists():
        shutil.rmtree(tmp)  # another process finished the same store first
    else:
        tmp.rename(out_dir)
    return out_dir


class RowStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / META_FILE).read_text())
        self.num_rows: int = self.meta["num_rows"]
        self.seq_len: int = self.meta["seq_len"]
        self.fingerprint: str = self.meta["fingerprint"]
        self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ROW_FIELDS}
        self._order_key: tuple[int, int] | None = None
        self._order = np.empty(0, np.int64)

    @staticmethod
    def exists(path: Path) -> bool:
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
        valid = row_indices >= 0
        out = {}
        for name, array in self._arrays.items():
            block = np.zeros((len(row_indices), array.shape[1]), array.dtype)[:, columns]
            block[valid] = array[row_indices[valid]][:, columns]
            out[name] = block
        return out

    def eval_batches(self, global_batch: int) -> list[np.ndarray]:
        """Every row once, in order, the last batch filled with empty rows."""
        padded = -np.ones(-(-self.num_rows // global_batch) * global_batch, np.int64)
        padded[: self.num_rows] = np.arange(self.num_rows)
        return list(padded.reshape(-1, global_batch))
