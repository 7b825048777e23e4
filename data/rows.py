"""Fixed-length training rows [T] from variable-length documents.

Row fields: `input_ids`, `segment_ids` (1, 2, ... per document, 0 = padding),
`positions` (restart at 0 per document) and `loss_weights` (weight of predicting token t).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable

import numpy as np

ROW_FIELDS = {"input_ids": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_weights": np.float32}


@dataclasses.dataclass
class Bins:
    """Documents grouped into bins: `doc` lists the document indices bin after bin, in the
    order they were placed; bin i holds the next `counts[i]` of them."""

    doc: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    def __iter__(self):
        return iter(np.split(self.doc, np.cumsum(self.counts)[:-1]) if len(self) else [])

    def first(self, n: int) -> "Bins":
        return Bins(self.doc[: int(self.counts[:n].sum())], self.counts[:n])

    @classmethod
    def one_per_document(cls, n: int) -> "Bins":
        return cls(np.arange(n), np.ones(n, np.int64))


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> Bins:
    """Bins of document indices: longest document first, into the fullest bin it fits.

    One plan over the whole dataset. Bins wait in buckets by free space, the free-space
    values that have bins in a sorted list of at most `capacity + 1` entries. Documents
    of one length are placed together, which is what makes a million documents take a
    fraction of a second instead of a bisection each: a bin with room for several of them
    takes them all at once (it stays the fullest bin they fit), and a bucket whose bins
    have room for one takes one per bin, its most recent bins first.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a document of {lengths.max()} tokens does not fit rows of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    needs, group_sizes = np.unique(-lengths[order], return_counts=True)  # longest first
    bin_at = np.empty(len(order), np.int64)  # the bin of the document at each place in `order`
    by_free: dict[int, list[int]] = {}  # free space -> bins with exactly that much room
    free_values: list[int] = []  # sorted keys of by_free
    num_bins = placed = 0

    def give_room(room: int, bins: list[int]) -> None:
        if room and bins:
            if room not in by_free:
                by_free[room] = []
                bisect.insort(free_values, room)
            by_free[room].extend(bins)

    for need, left in zip((-needs).tolist(), group_sizes.tolist()):
        while left:
            at = bisect.bisect_left(free_values, need)
            if at == len(free_values):  # new bins, each filled with as many as fit
                per_bin = capacity // need
                full, rest = divmod(left, per_bin)
                new = np.arange(num_bins, num_bins + full + bool(rest))
                bin_at[placed : placed + left] = np.repeat(new, per_bin)[:left]
                give_room(capacity - per_bin * need, new[:full].tolist())
                if rest:
                    give_room(capacity - rest * need, [num_bins + full])
                num_bins += len(new)
                placed, left = placed + left, 0
                continue
            space = free_values[at]
            bucket = by_free[space]
            if space >= 2 * need:  # its most recent bin takes as many as fit
                bins, take = [bucket.pop()], min(left, space // need)
                room = space - take * need
                bin_at[placed : placed + take] = bins[0]
            else:
                take, room = min(left, len(bucket)), space - need
                bins = bucket[-take:][::-1]
                del bucket[-take:]
                bin_at[placed : placed + take] = bins
            if not bucket:
                del by_free[space]
                free_values.pop(at)
            give_room(room, bins)
            placed, left = placed + take, left - take
    within = np.argsort(bin_at, kind="stable")  # placement order inside each bin
    return Bins(order[within], np.bincount(bin_at, minlength=num_bins))


@dataclasses.dataclass
class Placements:
    """Where each piece of a document goes, in row order: row, first column, document,
    first token taken from it, token count, and segment number within the row."""

    row: np.ndarray
    col: np.ndarray
    doc: np.ndarray
    src: np.ndarray
    n: np.ndarray
    segment: np.ndarray
    num_rows: int

    def rows(self, start: int, stop: int) -> "Placements":
        """The placements of rows [start, stop), rows renumbered from 0."""
        a, b = np.searchsorted(self.row, [start, stop])
        return Placements(self.row[a:b] - start, *(f[a:b] for f in (self.col, self.doc, self.src, self.n, self.segment)),
                          num_rows=stop - start)


def bin_placements(bins: Bins, lengths: np.ndarray) -> Placements:
    """One row per bin, its documents side by side from column 0."""
    counts, doc = bins.counts, bins.doc
    n = np.asarray(lengths, np.int64)[doc]
    first = np.cumsum(counts) - counts  # each bin's first entry
    ends = np.cumsum(n)
    col = ends - n - np.repeat((ends - n)[first], counts)
    segment = np.arange(len(doc)) - np.repeat(first, counts) + 1
    return Placements(np.repeat(np.arange(len(bins)), counts), col, doc, np.zeros_like(doc), n, segment, len(bins))


def wrapped_placements(lengths: np.ndarray, seq_len: int) -> Placements:
    """The seed's constant-length packing: documents concatenated in order and cut every
    T tokens, so a document may continue in the next row. Each piece is its own segment
    with positions from 0 and an untrained first token (nothing in its row precedes it);
    only the last row has padding."""
    lengths = np.asarray(lengths, np.int64)
    start = np.cumsum(lengths) - lengths  # each document's first token in the stream
    first_row, last_row = start // seq_len, (start + lengths - 1) // seq_len
    spans = last_row - first_row + 1
    doc = np.repeat(np.arange(len(lengths)), spans)
    row = np.repeat(first_row, spans) + np.arange(len(doc)) - np.repeat(np.cumsum(spans) - spans, spans)
    begin = np.maximum(start[doc], row * seq_len)
    end = np.minimum(start[doc] + lengths[doc], (row + 1) * seq_len)
    new_row = np.ones(len(row), bool)
    new_row[1:] = row[1:] != row[:-1]
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(len(row)), 0))
    num_rows = int(-(-lengths.sum() // seq_len))
    return Placements(row, begin - row * seq_len, doc, begin - start[doc], end - begin,
                      np.arange(len(row)) - row_first + 1, num_rows)


def fill_rows(placements: Placements, seq_len: int, document: Callable[[int], tuple[np.ndarray, np.ndarray]]
              ) -> dict[str, np.ndarray]:
    """Rows [num_rows, seq_len] from `placements`; `document(d)` gives (ids, weights) of
    document d. A piece's first token is never trained: nothing in its row precedes it."""
    p = placements
    rows = {name: np.zeros((p.num_rows, seq_len), dtype) for name, dtype in ROW_FIELDS.items()}
    for r, c, d, s, n, segment in zip(*(f.tolist() for f in (p.row, p.col, p.doc, p.src, p.n, p.segment))):
        ids, weights = document(d)
        rows["input_ids"][r, c : c + n] = ids[s : s + n]
        rows["segment_ids"][r, c : c + n] = segment
        rows["positions"][r, c : c + n] = np.arange(n)
        rows["loss_weights"][r, c : c + n] = weights[s : s + n]
        rows["loss_weights"][r, c] = 0.0
    return rows


def build_rows(docs_ids, docs_weights, bins: Bins, seq_len: int) -> dict[str, np.ndarray]:
    """In-memory rows, one per bin (benchmarks and tests; preparation writes shards)."""
    placements = bin_placements(bins, np.array([len(d) for d in docs_ids]))
    return fill_rows(placements, seq_len, lambda d: (docs_ids[d], docs_weights[d]))


def wrapped_rows(docs_ids, docs_weights, seq_len: int) -> dict[str, np.ndarray]:
    placements = wrapped_placements(np.array([len(d) for d in docs_ids], np.int64), seq_len)
    return fill_rows(placements, seq_len, lambda d: (docs_ids[d], docs_weights[d]))
