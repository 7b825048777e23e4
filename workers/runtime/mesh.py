"""The global device mesh and where batches, activations and optimizer state live on it
(parameters: `workers.models.partition`, from each family's rules).

Axes: `dp` (replicas), `fsdp` (parameters split, batch split), `tp` (Megatron tensor
parallelism: the projections each family splits by column or by row), `sp` (the
sequence split: activations, attention's queries, and parameters as fsdp splits them).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("dp", "fsdp", "tp", "sp")
BATCH_AXES = ("dp", "fsdp")
# What a parameter's "fsdp" dimension is split over (ZeRO-3): every axis that splits the
# data, so sp's devices, which hold other positions of the same rows, share the weights.
PARAM_SHARD_AXES = {"fsdp": ("fsdp", "sp")}


class ShardingError(ValueError):
    """A mesh that does not fit the devices or the model; the message says which dim."""


def global_mesh(dp: int = 1, fsdp: int = -1, tp: int = 1, sp: int = 1, devices=None, num_slices: int = 1) -> Mesh:
    """All devices of all processes (or `devices`); `-1` takes what the other axes leave.

    On TPU the mesh follows the slice's torus (`mesh_utils.create_device_mesh`), so the
    axes that talk most run over direct ICI links. With several TPU slices the dims
    describe one slice and `dp` is multiplied by `num_slices` over the data-center
    network: only the gradient all-reduce crosses it.
    """
    from jax.experimental import mesh_utils

    # Process-major order keeps each host's devices contiguous on the batch axes, so a
    # host's rows are one contiguous slice of the global batch.
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    if len(devices) % num_slices:
        raise ShardingError(f"{len(devices)} devices do not split into {num_slices} slices")
    dims = resolve_dims((dp, fsdp, tp, sp), len(devices) // num_slices)
    tpu = devices[0].platform == "tpu"
    # mesh_utils orders axes by rising traffic: tp (an all-reduce per matmul) gets the
    # best links, then sp (K/V gathers per layer), then fsdp; ours are (dp, fsdp, tp, sp).
    by_traffic = (dims[0], dims[1], dims[3], dims[2])
    if num_slices == 1:
        if not tpu:
            return Mesh(np.array(devices).reshape(dims), AXES)
        grid = mesh_utils.create_device_mesh(by_traffic, devices, allow_split_physical_axes=True)
    else:
        # TPU devices know their slice; elsewhere (CPU tests) each process stands for one.
        grid = mesh_utils.create_hybrid_device_mesh(
            by_traffic, (num_slices, 1, 1, 1), devices, process_is_granule=not tpu, allow_split_physical_axes=True
        )
    return Mesh(grid.transpose(0, 1, 3, 2), AXES)


def check_dims(dims: tuple[int, ...]) -> None:
    if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ShardingError(f"sharding_axis_dims {tuple(dims)}: sizes must be positive, with at most one -1")


def resolve_dims(dims: tuple[int, ...], count: int) -> list[int]:
    """The (dp, fsdp, tp, sp) sizes for `count` devices, `-1` filled in; used by the
    workers, and by SFTConfig wherever the device count is known before start-up."""
    check_dims(dims)
    known = int(np.prod([d for d in dims if d != -1]))
    resolved = [count // known if d == -1 else d for d in dims]
    if count % known or int(np.prod(resolved)) != count:
        raise ShardingError(f"sharding_axis_dims {tuple(dims)} (dp, fsdp, tp, sp) do not fit the {count} devices")
    return resolved


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over (dp, fsdp), positions over sp."""
    return NamedSharding(mesh, P(BATCH_AXES, "sp"))


def activation_spec() -> P:
    return P(BATCH_AXES, "sp", None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def optimizer_state_shardings(abstract_state, params: dict, param_shardings: dict[str, NamedSharding], mesh: Mesh):
    """Moments shaped like their parameter live with it; factored or scalar state is small
    and replicated."""

    def leaf(path, x):
        name = getattr(path[-1], "key", None)
        if name in params and x.shape == params[name].shape:
            return param_shardings[name]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf, abstract_state)
