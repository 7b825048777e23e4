"""The global device mesh and where parameters and batches live on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from raysft.workers.models.params import is_stacked

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")


def global_mesh(dp: int = 1, fsdp: int = -1, tp: int = 1) -> Mesh:
    """All devices of all processes; `-1` takes what the other axes leave."""
    # Process-major order keeps each host's devices contiguous on the batch axes, so a
    # host's rows are one contiguous slice of the global batch.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    dims = [dp, fsdp, tp]
    known = int(np.prod([d for d in dims if d != -1]))
    dims = [len(devices) // known if d == -1 else d for d in dims]
    if int(np.prod(dims)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, dims))} does not cover the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(dims), AXES)


def param_sharding(mesh: Mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
    """FSDP: split the largest dimension that the fsdp axis divides; else replicate.

    The layer axis of scanned layers is never split: each scan step needs its whole layer.
    """
    size = mesh.shape["fsdp"]
    spec = [None] * len(shape)
    if size > 1:
        dims = range(1 if is_stacked(name) else 0, len(shape))
        for dim in sorted(dims, key=lambda d: -shape[d]):
            if shape[dim] % size == 0:
                spec[dim] = "fsdp"
                break
    return NamedSharding(mesh, P(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
