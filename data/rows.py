"""Fixed-length training rows [T] from variable-length documents.

Row fields: `input_ids`, `segment_ids` (1, 2, ... per document, 0 = padding),
`positions` (restart at 0 per document) and `loss_weights` (weight of predicting token t).
"""

from __future__ import annotations

import bisect

import numpy as np

ROW_FIELDS = {"input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_weights": np.float32}


def truncate(docs_ids, docs_weights, max_len: int) -> tuple[list, list, int]:
    """Keep each document's first `max_len` tokens; returns the tokens cut off too."""
    cut = sum(max(0, len(d) - max_len) for d in docs_ids)
    return [d[:max_len] for d in docs_ids], [w[:max_len] for w in docs_weights], cut


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of document indices, longest first into the fullest bin that still fits."""
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for doc in order:
        need = int(lengths[doc])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            bins.append([int(doc)])
            bisect.insort(free, (capacity - need, len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(int(doc))
            bisect.insort(free, (space - need, b))
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
