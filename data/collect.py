"""The encoding tasks' small records (lengths, places, counts: no tokens) gathered on the
driver into the documents, in dataset order, and their stats; a bad row inside Ray's
task errors surfaces as our one-line `DataError`."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import numpy as np
import ray

from raysft.data.row_shards import Documents
from raysft.data.stall import Stalled, until_stalled
from raysft.storage.errors import DataError


def collect_documents(encoded, name: str, timeout_s: float, bar) -> tuple[Documents, dict]:
    """The documents' lengths and places, in dataset order, and the stats, from the
    encoding tasks' small records (no token passes through here)."""
    keys, lengths, shards, offsets, trained = [], [], [], [], []
    shard_names: dict[str, int] = {}
    dropped: Counter[str] = Counter()
    totals = dict(rows_read=0, truncated_tokens=0, dropped_turns=0, supervised_tokens=0.0)
    max_id, content = -1, np.zeros(2, np.uint64)
    try:
        with _ray_data_task_errors_unlogged():
            batches = encoded.iter_batches(batch_size=None, batch_format="numpy")
            for batch in until_stalled(batches, timeout_s, name, "reading and encoding"):
                kept = batch["dropped"] == ""
                rows = int((batch["piece"] == 0).sum())
                totals["rows_read"] += rows
                if bar is not None:
                    bar.update(rows)
                totals["truncated_tokens"] += int(batch["truncated_tokens"].sum())
                totals["dropped_turns"] += int(batch["dropped_turns"].sum())
                totals["supervised_tokens"] += float(batch["trained"].sum())
                dropped.update(batch["dropped"][~kept].tolist())
                max_id = max(max_id, int(batch["max_id"].max(initial=-1)))
                content += np.array([batch["hash0"].sum(), batch["hash1"].sum()], np.uint64)
                names, index = np.unique(batch["shard"][kept], return_inverse=True)
                ids = np.array([shard_names.setdefault(str(n), len(shard_names)) for n in names], np.int32)
                keys.append(np.stack([batch["file"][kept], batch["row"][kept], batch["piece"][kept]]).astype(np.int64))
                lengths.append(batch["length"][kept])
                shards.append(ids[index] if len(ids) else np.zeros(0, np.int32))
                offsets.append(batch["offset"][kept])
                trained.append(batch["trained"][kept])
    except Stalled:
        raise
    except Exception as err:  # Ray wraps task errors; surface ours as the one-line cause
        data_error = _find_data_error(err)
        if data_error is None:
            raise
        # Ray appends its retry advice on further lines; ours is the first.
        raise DataError(str(data_error).splitlines()[0]) from None
    if totals["rows_read"] == 0:
        raise DataError(f"{name}: the dataset has no rows")
    key = np.concatenate(keys, axis=1) if keys else np.zeros((3, 0), np.int64)
    if key.shape[1] == 0:
        raise DataError(f"{name}: the dataset has no rows left to train on (dropped: {dict(dropped)})")
    # Dataset order (file, row) whatever order the tasks finished in. Stable, and not by
    # piece: a row's pieces come from one task in order, and a source without row numbers
    # (all 0) keeps the order it was read in, each row's pieces together (a preference
    # pair's chosen and rejected sequences stay side by side).
    order = np.lexsort(key[1::-1])
    docs = Documents(np.concatenate(lengths)[order], np.concatenate(shards)[order], np.concatenate(offsets)[order],
                     list(shard_names), np.concatenate(trained)[order])
    stats = {
        "source": name,
        "rows_read": totals["rows_read"],
        "documents": int(len(order)),
        "dropped": dict(sorted(dropped.items())),
        "tokens": int(docs.length.sum()),
        "max_token_id": max_id,
        "supervised_tokens": int(totals["supervised_tokens"]),
        "truncated_tokens": totals["truncated_tokens"],
        "dropped_turns": totals["dropped_turns"],
        "content_hash": f"{int(content[0]):016x}{int(content[1]):016x}",
    }
    return docs, stats


@contextlib.contextmanager
def _ray_data_task_errors_unlogged():
    """Ray Data logs a failed task's whole remote trace before raising its error; the
    error still reaches the caller (a bad row as one line naming file, row and field)."""
    loggers = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    for logger in loggers:
        logger.addFilter(_below_error)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_below_error)


_RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _find_data_error(err: BaseException) -> DataError | None:
    """The worker's own DataError inside Ray's wrappers, whose text is a banner."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a Ray task error holds the worker's exception here
        if isinstance(cause, DataError):
            return cause
        if isinstance(err, DataError) and not isinstance(err, ray.exceptions.RayError):
            return err
        err = cause or err.__cause__ or err.__context__
    return None
