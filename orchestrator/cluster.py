"""Connect the driver to Ray: the cluster in RAY_ADDRESS, one started on this machine
with `ray start`, or else an embedded local one."""

from __future__ import annotations

import os

import ray


def connect(num_hosts: int) -> None:
    if ray.is_initialized():
        return
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
