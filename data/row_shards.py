"""Rows written by Ray tasks from the packing plan: each task builds a contiguous range of
row ids from the encoded documents on the shared store and writes it as its own shard,
so neither the driver nor any one task holds the dataset."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import ray
from etils import epath

from raysft.data.data_nodes import task_options
from raysft.data.rows import ROW_FIELDS, Placements, fill_rows
from raysft.data.stall import DEFAULT_TIMEOUT_S, stalled
from raysft.data.store import shard_file
from raysft.data.tokenize import DOC_FILES, doc_file
from raysft.storage.credentials import NONE, Credentials
from raysft.storage.locations import load_array, location, save_array

SHARD_BYTES = 128 << 20


@dataclasses.dataclass
class Documents:
    """What the driver holds of the encoded documents, in dataset order: lengths and where
    each one's tokens are (a shard of `docs_dir` and the offset in it)."""

    length: np.ndarray
    shard: np.ndarray  # index into shard_names
    offset: np.ndarray
    shard_names: list[str]
    trained: np.ndarray  # tokens with loss weight, per document

    @classmethod
    def join(cls, parts: list[tuple["Documents", np.ndarray]]) -> "Documents":
        """The documents `index` of each part, one after the other (an index may repeat)."""
        names: list[str] = []
        fields: dict[str, list[np.ndarray]] = {"length": [], "shard": [], "offset": [], "trained": []}
        for docs, index in parts:
            for name in fields:
                value = getattr(docs, name)[index]
                fields[name].append(value + len(names) if name == "shard" else value)
            names.extend(docs.shard_names)
        joined = {name: np.concatenate(values) for name, values in fields.items()}
        return cls(joined["length"], joined["shard"], joined["offset"], names, joined["trained"])


def rows_per_shard(seq_len: int) -> int:
    bytes_per_row = seq_len * sum(np.dtype(t).itemsize for t in ROW_FIELDS.values())
    return max(1, SHARD_BYTES // bytes_per_row)


def write_row_shards(placements: Placements, docs: Documents, docs_dir: epath.Path, store_dir: epath.Path, seq_len: int,
                     shard_rows: int, progress: Callable[[int], None] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     name: str = "rows", credentials: Credentials = NONE) -> list[int]:
    """Row shards of `shard_rows` rows (the last one shorter), one task each, spread over
    the cluster's nodes; returns the row count of each shard."""
    bounds = list(range(0, placements.num_rows, shard_rows)) + [placements.num_rows]
    selector = ray.data.DataContext.get_current().execution_options.label_selector
    # One remote function per call: the credentials go with it as with every reading task.
    write = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(credentials.around(_write_shard)).options(
        **task_options(selector), runtime_env=credentials.runtime_env())
    pending = {}
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = placements.rows(start, stop)
        needed = np.unique(part.doc).tolist()
        places = {d: (docs.shard_names[docs.shard[d]], int(docs.offset[d]), int(docs.length[d])) for d in needed}
        pending[write.remote(str(store_dir), index, part, places, str(docs_dir), seq_len)] = stop - start
    remaining = list(pending)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=timeout_s)
        if not done:
            raise stalled(name, timeout_s, "writing rows")
        ray.get(done[0])
        if progress:
            progress(pending[done[0]])
    return list(pending.values())


def _write_shard(store_dir: str, index: int, part: Placements, places: dict[int, tuple[str, int, int]],
                 docs_dir: str, seq_len: int) -> None:
    """`places`: each document's encoded shard, offset and length."""
    opened: dict[str, tuple[np.ndarray, ...]] = {}

    def document(d: int):
        shard, offset, length = places[d]
        if shard not in opened:
            opened[shard] = tuple(load_array(doc_file(docs_dir, shard, f)) for f in DOC_FILES)
        ids, weights = opened[shard]
        return ids[offset : offset + length], weights[offset : offset + length]

    rows = fill_rows(part, seq_len, document)
    for name, array in rows.items():
        save_array(shard_file(location(store_dir), name, index), array)
