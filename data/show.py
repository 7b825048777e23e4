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


def show_rows(store: RowStore, tokenizer, count: int, seed: int = 0) -> str:
    """`count` documents drawn at random (seeded): one from each of up to `count` random
    rows, then further documents of those rows if there are fewer rows than that."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.permutation(store.num_rows)[:count])
    rows = store.read(picked)
    order = [rng.permutation(np.unique(seg[seg > 0])) for seg in rows["segment_ids"]]
    blocks = []
    for depth in range(max((len(o) for o in order), default=0)):
        for i, segments in enumerate(order):
            if depth >= len(segments) or len(blocks) == count:
                continue
            at = rows["segment_ids"][i] == segments[depth]
            ids, weights = rows["input_ids"][i][at], rows["loss_weights"][i][at]
            header = (f"--- row {picked[i]}, document {segments[depth]}: {len(ids)} tokens, "
                      f"{int((weights > 0).sum())} trained ---")
            blocks.append(f"{header}\n{marked_text(tokenizer, ids, weights)}")
    return "\n".join(blocks)
