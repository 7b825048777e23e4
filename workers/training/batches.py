"""This host's slice of a global batch, read straight from the row store."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from raysft.data.store import RowStore


def global_batch(store: RowStore, row_indices: np.ndarray, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays [len(row_indices), T]; each process reads only its own devices' rows."""
    shape = (len(row_indices), store.seq_len)
    local = {}  # device index -> rows, so each distinct slice is read once
    out = {}
    for name in ("input_ids", "segment_ids", "positions", "loss_weights"):

        def read(index, name=name):
            key = (index[0].start, index[0].stop)
            if key not in local:
                local[key] = store.read(row_indices[index[0]])
            return local[key][name][:, index[1]]

        out[name] = jax.make_array_from_callback(shape, sharding, read)
    return out
