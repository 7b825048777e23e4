"""This host's slice of a global batch, read straight from the row store."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from raysft.data.rows import ROW_FIELDS
from raysft.data.store import RowStore
from raysft.workers.training.preference import REFERENCE_FIELD


def global_batch(store: RowStore, row_indices: np.ndarray, sharding: NamedSharding,
                 references=None) -> dict[str, jax.Array]:
    """Global arrays [len(row_indices), T]; each process reads only its own devices' rows.
    With `references` (the store's `ReferenceLogps`), the batch holds them too."""
    shape = (len(row_indices), store.seq_len)
    local = {}  # device index -> rows, so each distinct slice is read once
    out = {}
    names = [*ROW_FIELDS, *([REFERENCE_FIELD] if references is not None else [])]
    for name in names:

        def read(index, name=name):
            key = (index[0].start, index[0].stop)
            if key not in local:
                local[key] = store.read(row_indices[index[0]])
                if references is not None:
                    local[key][REFERENCE_FIELD] = references.read(row_indices[index[0]], store.seq_len)
            return local[key][name][:, index[1]]

        out[name] = jax.make_array_from_callback(shape, sharding, read)
    return out
