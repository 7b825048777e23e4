"""Prepare one dataset on a local multi-node Ray cluster, in a process of its own (the
test session holds an embedded Ray). Prints one JSON object: the store's path and, from
Ray's state API, the nodes that ran encoding actors and row-writing tasks.

    python data_cluster_worker.py NODES DATA TOKENIZER_DIR STORE_ROOT
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(nodes: int, data: str, tokenizer_dir: str, store_root: str) -> None:
    cluster = Cluster(
        initialize_head=True,  # the head has no CPUs: the work goes to the worker nodes
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    workers = {cluster.add_node(num_cpus=2).node_id for _ in range(nodes)}
    ray.init(address=cluster.address)
    try:
        store = prepare_dataset(Path(data), Path(tokenizer_dir), DataSettings(seq_len=32, packing=True),
                                Path(store_root), report=None, shard_rows=4)
        time.sleep(2)  # the state API learns of finished tasks from the nodes' reports
        writers = {t.node_id for t in list_tasks(filters=[("name", "=", "_write_shard")], limit=1000)}
        encoders = {a.node_id for a in list_actors(limit=1000) if "EncodeRows" in a.class_name}
        print(json.dumps({
            "store": str(store.path), "worker_nodes": sorted(workers),
            "row_writer_nodes": sorted(writers), "encoder_nodes": sorted(encoders),
            "shards": len(store.meta["shard_rows"]),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:5])
