"""Fixed-length training rows [T] from variable-length documents.

Row fields: `input_ids`, `segment_ids` (1, 2, ... per document, 0 = padding),
`positions` (restart at 0 per document) and `loss_weights` (weight of predicting token t).
"""

from __future__ import annotations

import bisect

import numpy as np

ROW_FIELDS = {"input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_weights": np.float32}


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of document indices: longest document first, into the fullest bin it fits.

    One plan over the whole dataset. Bins are kept in buckets by free space, and the
    free-space values that have bins in a sorted list of at most `capacity + 1` entries,
    so each placement is a bisection: O(n log T), seconds for a million documents.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a document of {lengths.max()} tokens does not fit rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> bins with exactly that much room
    free_values: list[int] = []  # sorted keys of by_free
    for doc, need in zip(order.tolist(), lengths[order].tolist()):
        at = bisect.bisect_left(free_values, need)
        if at == len(free_values):
            b, room = len(bins), capacity - need
            bins.append([doc])
        else:
            space = free_values[at]
            bucket = by_free[space]
            b = bucket.pop()
            if not bucket:
                del by_free[space]
                free_values.pop(at)
            bins[b].append(doc)
            room = space - need
        if room:
            if room not in by_free:
                by_free[room] = []
                bisect.insort(free_values, room)
            by_free[room].append(b)
    return bins


def build_rows(docs_ids, docs_weights, bins: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
    """Rows [len(bins), seq_len], one per bin, its documents side by side."""
    rows = {name: np.zeros((len(bins), seq_len), dtype) for name, dtype in ROW_FIELDS.items()}
    for r, members in enumerate(bins):
        start = 0
        for segment, doc in enumerate(members, start=1):
            n = len(docs_ids[doc])
            rows["input_ids"][r, start : start + n] = docs_ids[doc]
            rows["segment_ids"][r, start : start + n] = segment
            rows["positions"][r, start : start + n] = np.arange(n)
            rows["loss_weights"][r, start : start + n] = docs_weights[doc]
            start += n
    return rows


def wrapped_rows(docs_ids, docs_weights, seq_len: int) -> dict[str, np.ndarray]:
    """The seed's constant-length packing: documents concatenated in order and cut every
    T tokens, so a document may continue in the next row. Still segment-aware: each
    piece is its own segment with positions from 0 and an untrained first token, since
    nothing in its row precedes it. Only the last row has padding."""
    if not docs_ids:
        return {name: np.zeros((0, seq_len), dtype) for name, dtype in ROW_FIELDS.items()}
    ids = np.concatenate(docs_ids)
    weights = np.concatenate(docs_weights).astype(np.float32)
    doc_of_token = np.repeat(np.arange(len(docs_ids)), [len(d) for d in docs_ids])
    n_rows = -(-len(ids) // seq_len)
    pad = n_rows * seq_len - len(ids)
    ids = np.pad(ids, (0, pad)).reshape(n_rows, seq_len)
    weights = np.pad(weights, (0, pad)).reshape(n_rows, seq_len)
    doc = np.pad(doc_of_token, (0, pad), constant_values=-1).reshape(n_rows, seq_len)
    starts = np.ones_like(doc, bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]  # a new piece: a new document or a new row
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32) * (doc >= 0)
    piece_start = np.maximum.accumulate(np.where(starts, np.arange(seq_len), 0), axis=1)
    positions = (np.arange(seq_len) - piece_start).astype(np.int32) * (doc >= 0)
    weights[starts] = 0.0
    return {"input_ids": ids.astype(np.int32), "segment_ids": segment_ids, "positions": positions,
            "loss_weights": weights * (doc >= 0)}
