"""Train on a local multi-node Ray cluster whose nodes each have their own model caches,
in a process of its own (the test session holds an embedded Ray).

Two worker nodes, each with its own HF_HOME and RAYSFT_CACHE and hub access off; the
driver's HF cache holds only the model's config and tokenizer. The same model is trained
for one step from an `s3://` URI on the S3-compatible server at AWS_ENDPOINT_URL, whose
credentials only the driver has, then from a pre-cached hub id given to SFTTrainer as
a `from_pretrained` handle. Prints one JSON object: each run's first loss, the
driver's RSS growth while training from the handle, whether the handle ever read its
weights, and the model directories found in each node's cache.

    python model_sources_worker.py WORK_DIR HUB_ID S3_URI DATA_FILE
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

STORAGE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRss:
    def __init__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self.before = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def main(work: str, hub_id: str, s3_uri: str, data_file: str) -> None:
    work = Path(work)
    storage = {name: os.environ.pop(name) for name in STORAGE}  # the nodes start without credentials
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": free_port()},
    )
    for node in ("node0", "node1"):
        env = {"HF_HOME": str(work / node / "hf"), "RAYSFT_CACHE": str(work / node / "raysft"), "HF_HUB_OFFLINE": "1"}
        cluster.add_node(num_cpus=4, resources={"host": 1}, env_vars=env)
    ray.init(address=cluster.address)
    os.environ.update(storage)

    import raysft as rs

    def config(name: str) -> rs.SFTConfig:
        return rs.SFTConfig(
            model_name=name, save_directory=str(work / "runs"), max_sequence_length=32, total_batch_size=4,
            num_hosts=2, cpu_devices_per_host=1, worker_resources={"CPU": 1, "host": 1}, max_training_steps=1,
            log_steps=1, do_last_save=False, export_dtype="bfloat16",
        )

    try:
        s3 = rs.SFTTrainer(arguments=config("s3"), model=s3_uri, train_dataset=data_file, quiet=True).train()
        # Measured after a first run, so imports and Ray's own start-up are not counted.
        with PeakRss() as rss:
            handle = rs.AutoModelForCausalLM.from_pretrained(hub_id)
            hub = rs.SFTTrainer(arguments=config("hub"), model=handle, train_dataset=data_file, quiet=True).train()
        print(json.dumps({
            "hub_losses": [r["loss"] for r in hub.metrics if r["event"] == "step"],
            "s3_losses": [r["loss"] for r in s3.metrics if r["event"] == "step"],
            "driver_rss_growth": rss.peak - rss.before, "handle_read_weights": "params" in vars(handle),
            "node_caches": {node: sorted(p.name for p in (work / node / "raysft" / "copies").glob("*") if p.is_dir())
                            for node in ("node0", "node1")},
            "run_model": json.loads((work / "runs" / "s3" / "run.json").read_text())["model"],
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
