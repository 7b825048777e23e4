"""One JAX process of the sharded-loading test: join the group, load, report what it holds.

Run as `python sharded_load_worker.py MODEL_DIR COORDINATOR NUM_PROCESSES PROCESS_ID`.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from pathlib import Path


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(model_dir: str, coordinator: str, processes: int, rank: int) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)
    jax.distributed.initialize(coordinator, num_processes=processes, process_id=rank)

    from raysft.workers.runtime.mesh import global_mesh
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.loading import load_params

    mesh = global_mesh(fsdp=-1)
    layout = build_layout(ModelConfig.from_file(Path(model_dir) / "config.json"), jnp.float32, jnp.float32)
    # Warm the runtime (allocator, thread pools) so the growth below is the weights alone.
    from jax.sharding import NamedSharding, PartitionSpec

    warm = jax.make_array_from_callback(
        (4, 1024), NamedSharding(mesh, PartitionSpec("fsdp")), lambda idx: np.zeros((1, 1024), np.float32)
    )
    jax.block_until_ready(warm)
    before = resident_bytes()
    params, bytes_read = load_params(Path(model_dir), layout, lambda name, shape: param_sharding(mesh, name, shape))
    jax.block_until_ready(params)
    report = {
        "rank": rank,
        "total_bytes": sum(p.nbytes for p in params.values()),
        "addressable_bytes": sum(s.data.nbytes for p in params.values() for s in p.addressable_shards),
        "bytes_read": bytes_read,
        "resident_growth": resident_bytes() - before,
        "mesh": dict(mesh.shape),
    }
    print("REPORT " + json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
