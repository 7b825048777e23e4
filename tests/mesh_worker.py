"""One JAX process of the multi-host mesh test: 5 training steps per mesh layout.

Run as `python mesh_worker.py MODEL_DIR OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID`.
Process 0 writes the loss trajectories and the first step's gradients.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

LAYOUTS = {"dp": (4, 1, 1, 1), "fsdp": (1, 4, 1, 1), "tp": (1, 1, 4, 1), "fsdp_tp": (1, 2, 2, 1), "fsdp_sp": (1, 2, 1, 2)}
STEPS = 5


def batches(vocab: int, steps: int = STEPS, b: int = 8, t: int = 32) -> list[dict[str, np.ndarray]]:
    """Seeded batches whose rows have very different supervised-token counts."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        weights = np.zeros((b, t), np.float32)
        for r in range(b):
            weights[r, rng.integers(1, t):] = 1.0
        out.append({
            "input_ids": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_weights": weights,
        })
    return out


def run(model_dir: Path, dims, accumulation: int = 1, devices=None, num_slices: int = 1, with_grads: bool = True):
    """(losses of STEPS AdamW steps, first-step gradients on host or None) on mesh `dims`."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils

    from raysft.workers.runtime.mesh import batch_sharding, global_mesh, optimizer_state_shardings
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.loading import load_params
    from raysft.workers.models.runtime import ModelRuntime
    from raysft.workers.training.step import make_gradient_fn, make_train_step

    mesh = global_mesh(*dims, devices=devices, num_slices=num_slices)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime("vanilla", mesh=mesh))
    p_shard = {n: param_sharding(mesh, n, s.shape) for n, s in layout.shapes.items()}
    params, _ = load_params(model_dir, layout, lambda n, shape: p_shard[n])
    rows = batch_sharding(mesh)
    optimizer = optax.adamw(1e-2)
    opt_shard = optimizer_state_shardings(jax.eval_shape(optimizer.init, params), params, p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shard)(params)
    step = make_train_step(layout, optimizer, (p_shard, opt_shard), gradient_accumulation_steps=accumulation, batch_sharding=rows)
    gradient = jax.jit(make_gradient_fn(layout, gradient_accumulation_steps=accumulation, batch_sharding=rows))
    losses, grads = [], None
    for i, host_batch in enumerate(batches(cfg.vocab_size)):
        batch = {k: jax.make_array_from_callback(v.shape, rows, lambda idx, v=v: v[idx]) for k, v in host_batch.items()}
        if i == 0 and with_grads:
            g, _ = gradient(params, batch)
            grads = {n: np.asarray(multihost_utils.process_allgather(x, tiled=True)) for n, x in g.items()}
        params, opt_state, metrics = step(params, opt_state, batch, {}, 0)
        losses.append(float(metrics["loss"]))
    return losses, grads


def main(model_dir: str, out_dir: str, coordinator: str, processes: int, rank: int) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 4 // processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=processes, process_id=rank)
    out = {}
    for name, dims in LAYOUTS.items():
        # One layout's gradients are compared (each program compiles in seconds on 2 cores).
        losses, grads = run(Path(model_dir), dims, with_grads=name == "fsdp")
        out[name] = losses
        if name == "fsdp" and rank == 0:
            np.savez(Path(out_dir) / "grads_2hosts.npz", **grads)
    # Each process stands for one TPU slice: dp runs across them (the DCN axis), fsdp within.
    from raysft.workers.runtime.mesh import global_mesh

    out["two_slices"], _ = run(Path(model_dir), (1, 2, 1, 1), num_slices=2, with_grads=False)
    mesh = global_mesh(1, 2, 1, 1, num_slices=2)
    slices = [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(mesh.shape["dp"])]
    if rank == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(out))
        (Path(out_dir) / "slices.json").write_text(json.dumps({"shape": dict(mesh.shape), "dp_processes": slices}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
