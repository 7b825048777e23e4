"""A Ray cluster with one node whose disk differs from the driver's at two paths, in a
process of its own: the worker node runs in a mount namespace where SAVE_DIR and
MODEL_DIR are empty tmpfs mounts (what a node-local disk looks like to it), the driver
sees the real directories. Trains twice, each time expecting the one-line refusal
before any data is prepared. Prints one JSON object with both messages and whether any
data was prepared.

    python node_check_worker.py SAVE_DIR MODEL_DIR SHARED_SAVE_DIR DATA_FILE
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusal(config, model: str, data: str) -> str:
    import raysft as rs

    try:
        rs.SFTTrainer(arguments=config, model=model, train_dataset=data, quiet=True).train()
    except ValueError as err:
        return str(err)
    return "trained"


def main(save_dir: str, model_dir: str, shared_save_dir: str, data: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(p)}" for p in (save_dir, model_dir))
    ray_start = f"exec {shlex.quote(str(Path(sys.executable).parent / 'ray'))} start --address={cluster.address} --num-cpus=2 --block"
    ray.init(address=cluster.address)
    node = None
    try:
        # A raylet may die while registering on a loaded machine: start it again (3 tries).
        for attempt in range(3):
            node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {ray_start}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            deadline = time.time() + 120
            while sum(n["Alive"] for n in ray.nodes()) < 2 and node.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            if sum(n["Alive"] for n in ray.nodes()) >= 2:
                break
            _stop(node)
        else:
            raise SystemExit(f"the namespaced node did not join in 3 tries (exit {node.poll()})")
        import raysft as rs

        def config(save_directory: str):
            return rs.SFTConfig(model_name="check", save_directory=save_directory, max_sequence_length=32,
                                total_batch_size=4, num_hosts=2, max_training_steps=1)

        print(json.dumps({
            "local_save_directory": refusal(config(save_dir), model_dir, data),
            "local_model": refusal(config(shared_save_dir), model_dir, data),
            "prepared": [str(p) for p in Path(save_dir).rglob("data/*")] + [str(p) for p in Path(shared_save_dir).rglob("data/*")],
        }))
    finally:
        ray.shutdown()
        if node is not None:
            _stop(node)
        cluster.shutdown()
        # `ray start` wrote this cluster's address where a plain `ray.init()` looks for one.
        address_file = Path(get_ray_address_file(None))
        if address_file.is_file() and address_file.read_text().strip() == cluster.address:
            address_file.unlink()


def _stop(node: subprocess.Popen) -> None:
    """`ray start --block` stops its raylet and workers on SIGTERM; its group is killed
    after a minute, or at once where it has already gone."""
    try:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)


if __name__ == "__main__":
    main(*sys.argv[1:5])
