"""Prepare data on a cluster that Ray's own autoscaler (v2) grows, in a process of its own.

The cluster starts as a head without CPUs. Its node types are `cpu_data` (CPUs only) and
`tpu_host` (the resources and pod-type label of a v4-16 slice host); the nodes are Ray's
fake multi-node provider's (real raylets on this machine), used as an external provider
since Ray's wheel ships without the provider's default config. Prints one JSON object:
the node types the autoscaler launched, the node types that ran the data work, and the
node types alive once the idle timeout has passed.

    python autoscaling_data_worker.py DATA TOKENIZER_DIR STORE_ROOT
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver joins a cluster this script starts

import ray  # noqa: E402
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID  # noqa: E402
from ray.util.state import list_actors, list_tasks  # noqa: E402

from raysft.data.data_nodes import TPU_POD_LABEL, off_tpu_hosts  # noqa: E402
from raysft.data.prepare import prepare_dataset  # noqa: E402
from raysft.data.settings import DataSettings  # noqa: E402

PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
NODE_TYPES = {
    "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    "cpu_data": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    "tpu_host": {"resources": {"CPU": 2, "TPU": 4}, "labels": {TPU_POD_LABEL: "v4-16"}, "node_config": {},
                 "min_workers": 0, "max_workers": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head() -> str:
    ip = ray.util.get_node_ip_address()
    address = f"{ip}:{free_port()}"
    config = {
        "cluster_name": "raysft-test", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "external", "module": PROVIDER, "gcs_address": address, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": NODE_TYPES, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path = Path(tempfile.mkdtemp()) / "autoscaling.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={address.rsplit(':', 1)[1]}",
         f"--autoscaling-config={path}", "--num-cpus=0", f"--dashboard-port={free_port()}",
         f"--ray-client-server-port={free_port()}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         # Its own temp dir: the default one's address file would make every later
         # `ray.init()` on this machine join this cluster, long after it is gone.
         f"--temp-dir={tempfile.mkdtemp(prefix='raysft-autoscaling-')}"],
        env=env, check=True, capture_output=True,
    )
    return address


def node_types() -> dict[str, str]:
    """Alive nodes: id -> node type, from the resources each type has."""
    types = {}
    for node in ray.nodes():
        if node["Alive"]:
            resources = node["Resources"]
            types[node["NodeID"]] = "tpu_host" if "TPU" in resources else "cpu_data" if "CPU" in resources else "head"
    return types


def main(data: str, tokenizer_dir: str, store_root: str) -> None:
    address = start_head()
    ray.init(address=address)
    seen: dict[str, str] = {}
    store = prepare_dataset(Path(data), Path(tokenizer_dir), DataSettings(seq_len=32, packing=True), Path(store_root),
                            report=None, shard_rows=4, label_selector=off_tpu_hosts(["v4-16"]), timeout_s=240)
    seen.update(node_types())
    time.sleep(2)  # the state API learns of finished tasks from the nodes' reports
    tasks = list_tasks(address=address, limit=10000)  # this cluster: the machine may run others
    workers = {t.node_id for t in tasks if t.name == "_write_shard" or t.name.startswith("Read")}
    workers |= {a.node_id for a in list_actors(address=address, limit=1000) if "EncodeRows" in a.class_name}
    deadline = time.time() + 120  # idle_timeout_minutes 0.1: the data nodes go after ~6 s idle
    while time.time() < deadline and set(node_types().values()) != {"head"}:
        time.sleep(1)
    print(json.dumps({
        "documents": store.meta["documents"],
        "launched": sorted(set(seen.values()) - {"head"}),
        "data_work_on": sorted({seen.get(n, "unknown") for n in workers}),
        "alive_after_idle": sorted(set(node_types().values())),
    }))
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
