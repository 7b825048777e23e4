"""Where each parameter lives on the mesh: the families' partition rules (`families`:
which projections tensor parallelism splits by column and by row), applied by name.
Embeddings and kernels split over fsdp (ZeRO-3) and tp; a mixture of experts' experts
split over fsdp whole (expert parallelism: `experts`); norms and routers are small and
replicated."""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from raysft.workers.runtime.mesh import PARAM_SHARD_AXES, ShardingError
from raysft.workers.models.families import COLUMN_PROJECTIONS, ROW_PROJECTIONS
from raysft.workers.models.params import is_stacked
from raysft.workers.models.quantization import SCALE_LEAF


def param_spec(name: str, shape: tuple[int, ...]) -> tuple:
    """Axis names per dimension of parameter `name`, before any layer axis."""
    parts = name.split(".")
    module, leaf = parts[-2] if len(parts) > 1 else "", parts[-1]
    if leaf == "embedding":  # [vocab, hidden]
        return ("tp", "fsdp")
    if len(parts) > 2 and parts[-3] == "experts":
        # [E, in, out]: whole experts over fsdp (expert parallelism, `experts`), the
        # intermediate dimension over tp; LoRA's A [E, in, r] and B [E, r, out] with them.
        kernel = ("fsdp", "tp", None) if module == "down_proj" else ("fsdp", None, "tp")
        return {"lora_a": kernel[:2] + (None,), "lora_b": (kernel[0], None, kernel[2])}.get(leaf, kernel)
    if leaf == "kernel" and module in COLUMN_PROJECTIONS:  # [in, out]: split the outputs over tp
        return ("fsdp", "tp")
    if leaf == "kernel" and module in ROW_PROJECTIONS:  # [in, out]: split the inputs over tp
        return ("tp", "fsdp")
    if leaf == "bias" and module in COLUMN_PROJECTIONS:
        return ("tp",)
    # LoRA's A [in, r] and B [r, out] split their in and out dims as the kernel does, and
    # QLoRA's scales [in / block, out] both.
    kernel = param_spec(name.rsplit(".", 1)[0] + ".kernel", ()) if leaf in ("lora_a", "lora_b", SCALE_LEAF) else None
    if leaf == SCALE_LEAF:
        return kernel
    if leaf == "lora_a":
        return (kernel[0], None)
    if leaf == "lora_b":
        return (None, kernel[1])
    return (None,) * len(shape)  # norms, row-parallel biases: small, replicated


def param_sharding(mesh: Mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
    stacked = is_stacked(name)
    dims = shape[1:] if stacked else shape
    entries = []
    for size, axis in zip(dims, param_spec(name, dims)):
        axes = tuple(a for a in PARAM_SHARD_AXES.get(axis, (axis,)) if a and mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in axes]))
        if size % ways and name.endswith(SCALE_LEAF):  # fewer blocks than shards: small, replicated
            axes = ()
        elif size % ways:
            raise ShardingError(
                f"parameter {name} {tuple(shape)}: dimension {size} is not divisible by mesh "
                f"{' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}; choose sharding_axis_dims that divide it"
            )
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(*(((None,) if stacked else ()) + tuple(entries))))
