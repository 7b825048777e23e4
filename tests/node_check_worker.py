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
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {ray_start}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ray.init(address=cluster.address)
    try:
        deadline = time.time() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            if time.time() > deadline or node.poll() is not None:
                raise SystemExit(f"the namespaced node did not join (exit {node.poll()})")
            time.sleep(0.5)
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
        os.killpg(node.pid, signal.SIGTERM)  # ray start --block stops its raylet and workers
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
