"""Join this host's JAX process to the job's `jax.distributed` group."""

from __future__ import annotations

import logging
import socket

import ray.train
from ray.train.collective import broadcast_from_rank_zero

from raysft.storage.shared_storage import require_what_the_driver_sees
from raysft.workers.runtime.watchdog import Watchdog
from raysft.workers.spec import TrainSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_jax_distributed(backend: str, cpu_devices_per_host: int, timeout_s: float) -> None:
    """Initialise `jax.distributed` across the Ray Train worker group.

    Ray Train's JaxTrainer does this itself on GPU and TPU; on CPU rank 0 picks the
    coordinator address and shares it. Must run before anything touches JAX's backend.
    """
    import jax

    if backend != "cpu":
        return
    jax.config.update("jax_num_cpu_devices", cpu_devices_per_host)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    address = f"{ray.util.get_node_ip_address()}:{_free_port()}" if rank == 0 else None
    address = broadcast_from_rank_zero(address)
    jax.distributed.initialize(address, num_processes=world, process_id=rank, initialization_timeout=int(timeout_s))


def join_worker_group(spec: TrainSpec) -> Watchdog:
    """What every worker does first: check that it sees the run directory and the model
    where the driver does, start its watchdog, then join `jax.distributed`."""
    require_what_the_driver_sees(spec.storage_marker, spec.model)
    # orbax logs every save phase through absl at INFO; keep the driver's console readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    watchdog = Watchdog(spec.startup_timeout_s, spec.step_timeout_s, ray.train.get_context().get_world_rank())
    watchdog.progress("joining jax.distributed")
    init_jax_distributed(spec.backend, spec.cpu_devices_per_host, spec.startup_timeout_s)
    return watchdog
