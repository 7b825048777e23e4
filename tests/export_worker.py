"""One JAX process of the multi-process export test: join the group, load the model
sharded (scanned layers, fsdp over every device), export it.

Run as `python export_worker.py MODEL_DIR OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(model_dir: str, out_dir: str, coordinator: str, processes: int, rank: int) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator, num_processes=processes, process_id=rank)

    from raysft.workers.runtime.mesh import global_mesh
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig, read_hf_config
    from raysft.workers.models.export import save_pretrained
    from raysft.workers.models.loading import load_params
    from raysft.workers.models.runtime import ModelRuntime

    mesh = global_mesh(fsdp=-1)
    config = ModelConfig.from_file(Path(model_dir) / "config.json")
    layout = build_layout(config, jnp.float32, jnp.float32, ModelRuntime(scan_layers=True))
    params, _ = load_params(Path(model_dir), layout, lambda name, shape: param_sharding(mesh, name, shape))
    save_pretrained(params, read_hf_config(Path(model_dir) / "config.json"), Path(out_dir))
    print("EXPORTED", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
