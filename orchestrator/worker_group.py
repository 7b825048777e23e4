"""One Ray Train JAX worker group: one worker per host (CPU, GPU or whole TPU slices)."""

from __future__ import annotations

from typing import Any, Callable

from etils import epath

from raysft.orchestrator.config import SFTConfig
from raysft.storage.credentials import Credentials
from raysft.storage.files import portable_filesystem
from raysft.storage.locations import is_object_storage
from raysft.workers.runtime.xla_cpu import cpu_worker_env


def worker_env(cpu: bool) -> dict[str, str]:
    """What a worker process starts with besides the driver's storage settings (never a
    secret: `Credentials`): on CPU, JAX kept there, raysft's XLA:CPU options and glibc
    tunables (Ray starts the process with them, where glibc reads them)."""
    env = {}
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env.update(cpu_worker_env())
    return env


def worker_group(
    args: SFTConfig, loop: Callable[[dict], None], loop_config: dict[str, Any], run_dir: epath.Path, name: str
):
    """A `JaxTrainer` that runs `loop(loop_config)` on every host once; Ray retries nothing
    (the caller decides what a failure means)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxTrainer

    tpu = args.tpu_slice
    if tpu is not None:
        scaling = ScalingConfig(
            num_workers=tpu.num_workers,
            use_tpu=True,
            topology=tpu.topology,
            accelerator_type=tpu.accelerator_type,
            resources_per_worker={**tpu.resources_per_worker, **(args.worker_resources or {})},
        )
    else:
        gpu = args.backend == "gpu"
        default = {"GPU": 1} if gpu else {"CPU": 1}
        scaling = ScalingConfig(
            num_workers=args.num_hosts, use_gpu=gpu, resources_per_worker=args.worker_resources or default
        )
    # Ray Train's own run state goes next to the run. On object storage, as a filesystem
    # made here: its controller runs on another node, without the driver's environment.
    storage_fs, storage_path = portable_filesystem((run_dir / "ray").as_posix()) if is_object_storage(run_dir) else (
        None, str(run_dir / "ray"))
    # Models, checkpoints and data on object storage are read with the driver's
    # credentials, whatever environment the nodes were started in.
    credentials = Credentials.of_driver()
    return JaxTrainer(
        credentials.around(loop),
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
            worker_runtime_env=credentials.runtime_env(worker_env(args.backend == "cpu")) or {},
        ),
    )
