"""Connect the driver to Ray: the cluster in RAY_ADDRESS, one started on this machine
with `ray start`, or else an embedded local one."""

from __future__ import annotations

import os
import warnings

import ray

from raysft.orchestrator import ray_logs


def connect(num_hosts: int) -> None:
    connected_here = not ray.is_initialized()
    if connected_here:
        # Starting Ray launches its processes with fork and exec, which JAX (when the
        # driver has imported it) warns about as if the child went on running Python.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
            _connect(num_hosts)
    ray_logs.after_connect(connected_here)


def _connect(num_hosts: int) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # under `ray job submit` or against a running cluster
        return
    # Logical CPUs beyond the cores, so the Train controller, the workers and the Ray
    # Data tasks never wait on each other for a slot on a small machine. The dashboard
    # serves Ray's state API, which Ray Train polls; it listens on localhost only.
    try:
        ray.init(
            num_cpus=max(8, 2 * (os.cpu_count() or 1), 2 * num_hosts + 4),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )
    except ValueError as err:
        # Ray found a cluster started here with `ray start` (before connecting to it) and
        # refuses resource arguments for it: join that cluster as it is.
        if "existing cluster" not in str(err):
            raise
        ray.init()
