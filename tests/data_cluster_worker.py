"""Prepare one dataset on a local multi-node Ray cluster, in a process of its own (the
test session holds an embedded Ray). Prints one JSON object: the store's path and, from
Ray's state API, the nodes that ran reading, encoding and row-writing tasks.
With TPU_HOSTS, that many more nodes carry the resources and labels of v4-16 slice hosts.

    python data_cluster_worker.py NODES DATA TOKENIZER_DIR STORE_ROOT [TPU_HOSTS]
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from raysft.data.data_nodes import TPU_POD_LABEL, off_tpu_hosts
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished_tasks(writes: int, timeout_s: float = 60):
    """The state API hears of finished tasks from the nodes' reports, late on a loaded
    machine: wait until it knows of every row write."""
    deadline = time.monotonic() + timeout_s
    while True:
        # This cluster's own address: the test session's embedded Ray may run beside it.
        tasks = list_tasks(address=ray.get_runtime_context().gcs_address, limit=10000, filters=[("state", "=", "FINISHED")])
        if sum(t.name == "_write_shard" for t in tasks) >= writes or time.monotonic() > deadline:
            return tasks
        time.sleep(1)


def main(nodes: int, data: str, tokenizer_dir: str, store_root: str, tpu_hosts: int = 0) -> None:
    cluster = Cluster(
        initialize_head=True,  # the head has no CPUs: the work goes to the worker nodes
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    workers = {cluster.add_node(num_cpus=2).node_id for _ in range(nodes)}
    tpus = {cluster.add_node(num_cpus=2, resources={"TPU": 4}, labels={TPU_POD_LABEL: "v4-16", "ray.io/tpu-worker-id": str(i)}).node_id
            for i in range(tpu_hosts)}
    ray.init(address=cluster.address)
    try:
        store = prepare_dataset(Path(data), Path(tokenizer_dir), DataSettings(seq_len=32, packing=True),
                                Path(store_root), report=None, shard_rows=4, label_selector=off_tpu_hosts(),
                                # Batches enough for both nodes, and more tasks at once than one node has CPUs.
                                batch_size=8, num_proc=4)
        tasks = _finished_tasks(len(store.meta["shard_rows"]))
        writers = {t.node_id for t in tasks if t.name == "_write_shard"}
        readers = {t.node_id for t in tasks if t.name.startswith("Read")}
        encoders = {t.node_id for t in tasks if "encode_rows" in t.name}
        print(json.dumps({
            "store": str(store.path), "worker_nodes": sorted(workers), "tpu_nodes": sorted(tpus),
            "reader_nodes": sorted(readers), "row_writer_nodes": sorted(writers), "encoder_nodes": sorted(encoders),
            "shards": len(store.meta["shard_rows"]),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:5], *map(int, sys.argv[5:6]))
