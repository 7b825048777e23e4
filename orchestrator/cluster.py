"""Connect the driver to Ray: the cluster in RAY_ADDRESS, one started on this machine
with `ray start`, or else an embedded local one."""

from __future__ import annotations

import logging
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
    local = {}
    stale = _unreachable_ray_start_address()
    if stale:
        # With Ray's own lines (run_dir/logs/ray.log, the console with --verbose): what
        # happens next is what happens where no cluster was ever started.
        logging.getLogger("ray").warning(
            "the cluster `ray start` last started on this machine (%s) does not answer; starting an embedded Ray", stale
        )
        local = {"address": "local"}
    try:
        ray.init(
            num_cpus=max(8, 2 * (os.cpu_count() or 1), 2 * num_hosts + 4),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            **local,
        )
    except ValueError as err:
        # Ray found a cluster started here with `ray start` (before connecting to it) and
        # refuses resource arguments for it: join that cluster as it is.
        if "existing cluster" not in str(err):
            raise
        ray.init()


def _unreachable_ray_start_address() -> str | None:
    """The address `ray start` left on this machine when nothing listens there any more
    (a cluster that crashed, or was stopped without `ray stop`): `ray.init()` would wait
    for it for ever instead of starting Ray here."""
    import socket

    from ray._private.services import find_bootstrap_address  # where ray.init() looks

    address = find_bootstrap_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return None
    except (OSError, ValueError):
        return address
