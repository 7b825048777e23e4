"""Prepared rows as text with the trained tokens marked, to check a loss mask by eye."""

from __future__ import annotations

import numpy as np

from raysft.data.store import RowStore

OPEN, CLOSE = "[[", "]]"


def marked_text(tokenizer, ids: np.ndarray, weights: np.ndarray) -> str:
    """The decoded tokens, each run of trained tokens inside [[ ]]."""
    parts, run, trained = [], [], False
    for token, weight in zip(ids.tolist(), (weights > 0).tolist()):
        if weight != trained and run:
            text = tokenizer.decode(run)
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
            run = []
        run.append(token)
        trained = weight
    if run:
        text = tokenizer.decode(run)
        parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(parts)


def show_rows(store: RowStore, tokenizer, count: int) -> str:
    """The first `count` documents of the store, one block each."""
    blocks = []
    rows = store.read(np.arange(min(store.num_rows, count)))
    for r in range(len(rows["input_ids"])):
        segments = rows["segment_ids"][r]
        for segment in np.unique(segments[segments > 0]):
            if len(blocks) == count:
                return "\n".join(blocks)
            at = segments == segment
            ids, weights = rows["input_ids"][r][at], rows["loss_weights"][r][at]
            header = f"--- row {r}, document {segment}: {len(ids)} tokens, {int((weights > 0).sum())} trained ---"
            blocks.append(f"{header}\n{marked_text(tokenizer, ids, weights)}")
    return "\n".join(blocks)
