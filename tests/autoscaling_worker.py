"""A raysft run on a cluster that Ray's own autoscaler (v2) grows, in a process of its own.

The cluster starts as a head without CPUs. Its node types are `cpu_data` (CPUs only) and
the two hosts of one TPU v4-16 slice, `slice_host_0` and `slice_host_1`, with the
resources and labels Ray gives a real slice's hosts (`TPU`, `TPU-v4-16-head` on host 0,
the accelerator type, pod type, worker id, slice name and topology labels), so Ray
Train reserves the slice as on a pod. The nodes are Ray's fake multi-node provider's (real
raylets on this machine, used as an external provider since Ray's wheel ships without the
provider's default config); their JAX runs on CPU. Runs live on a real S3-compatible
server on 127.0.0.1 whose credentials only the driver has.

First an uninterrupted run (the autoscaler brings up the data nodes, then the slice), then
the same run whose slice host 1 is killed after a checkpoint (the autoscaler replaces it
and the run resumes from the bucket), then nothing: the idle nodes go. Prints one JSON
object for the test.

    python autoscaling_worker.py WORK_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver joins a cluster this script starts
os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by the nodes: the "slice hosts" have no TPU
# Ray reads a host's slice name from the TPU VM's metadata, or on GKE from TPU_NAME.
os.environ["TPU_NAME"] = "slice-a"
os.environ["RAYSFT_CACHE"] = sys.argv[1] + "/cache"  # the nodes' caches, not the user's

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID  # noqa: E402
from ray.util.state import list_actors, list_tasks  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CORPUS, free_port, save_tiny_model, serve_bucket, train_tokenizer, write_jsonl  # noqa: E402

import raysft as rs  # noqa: E402
from raysft.data.data_nodes import TPU_POD_LABEL  # noqa: E402
from raysft.storage.locations import local_copy  # noqa: E402
from raysft.orchestrator.export import checkpoint_steps  # noqa: E402

PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
SLICE_LABELS = {TPU_POD_LABEL: "v4-16", "ray.io/tpu-slice-name": "slice-a", "ray.io/accelerator-type": "TPU-V4",
                "ray.io/tpu-topology": "2x2x2"}
SLICE_RESOURCES = {"CPU": 1, "TPU": 4, "accelerator_type:TPU-V4": 1}
NODE_TYPES = {
    "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
    "cpu_data": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1},
    "slice_host_0": {"resources": {**SLICE_RESOURCES, "TPU-v4-16-head": 1},
                     "labels": {**SLICE_LABELS, "ray.io/tpu-worker-id": "0"}, "node_config": {},
                     "min_workers": 0, "max_workers": 1},
    "slice_host_1": {"resources": SLICE_RESOURCES, "labels": {**SLICE_LABELS, "ray.io/tpu-worker-id": "1"},
                     "node_config": {}, "min_workers": 0, "max_workers": 1},
}
SAVE_STEPS = 4
STEPS = 20
BUCKET = "raysft-autoscaled"


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


def observe(seen: dict[str, dict]) -> None:
    """Each node ever alive: its type and when it was first seen."""
    for node, kind in node_types().items():
        seen.setdefault(node, {"type": kind, "first_seen": time.time()})


def node_types() -> dict[str, str]:
    """Alive nodes: id -> node type."""
    types = {}
    for node in ray.nodes():
        if node["Alive"]:
            labels, resources = node.get("Labels", {}), node["Resources"]
            worker_id = labels.get("ray.io/tpu-worker-id")
            types[node["NodeID"]] = f"slice_host_{worker_id}" if worker_id else "cpu_data" if "CPU" in resources else "head"
    return types


def kill_node(node_id: str) -> None:
    """SIGKILL every process of a fake node (its raylet and the workers under it), as a
    host that disappears."""
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def train(runs: str, name: str, model_dir: Path, data: Path, seen: dict[str, dict], kill: bool) -> dict:
    cfg = rs.SFTConfig(
        model_name=name, save_directory=runs, tpu_type="v4-16", plan_before_training=False, dtype="float32",
        param_dtype="float32", max_sequence_length=64, total_batch_size=8, learning_rate=3e-3,
        max_training_steps=STEPS, num_train_epochs=100, save_steps=SAVE_STEPS, log_steps=1, max_restarts=2,
        startup_timeout_s=600,
    )
    result: dict = {}
    event: dict = {}
    done = threading.Event()

    def run():
        try:
            result["out"] = rs.SFTTrainer(arguments=cfg, model=model_dir, train_dataset=data, quiet=True).train()
        except BaseException as err:  # reported by the test
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    while not done.is_set():
        observe(seen)
        if kill and not event and any(s >= 2 * SAVE_STEPS for s in checkpoint_steps(cfg.run_dir)):
            victim = next(n for n, t in node_types().items() if t == "slice_host_1")
            event = {"checkpoints_at_kill": checkpoint_steps(cfg.run_dir), "node": victim, "killed_at": time.time()}
            kill_node(victim)
        time.sleep(0.5)
    thread.join()
    if "error" in result:
        return {"error": result["error"], "event": event}
    out = result["out"]
    return {"summary": {k: v for k, v in out.summary.items() if k != "spec"}, "records": out.metrics,
            "export_dir": str(local_copy(out.export_dir)), "event": event}


def main(work: Path) -> None:
    model_dir = work / "model"
    tokenizer = train_tokenizer(model_dir)
    save_tiny_model(model_dir, len(tokenizer))
    data = write_jsonl(work / "train.jsonl", [{"text": " ".join(CORPUS[i % 6:] + CORPUS[: i % 6])} for i in range(48)])
    address = start_head()
    runs = f"{serve_bucket(BUCKET)}/runs"  # after the head: the nodes never see these credentials
    ray.init(address=address)
    seen: dict[str, dict] = {}
    results = {"uninterrupted": train(runs, "whole", model_dir, data, seen, kill=False)}
    results["slice_host_killed"] = train(runs, "killed", model_dir, data, seen, kill=True)
    time.sleep(2)  # the state API learns of finished tasks from the nodes' reports
    tasks = list_tasks(address=address, limit=10000)  # this cluster: the machine may run others
    data_work = {t.node_id for t in tasks if t.name == "_write_shard" or t.name.startswith("Read") or "encode_rows" in t.name}
    trainers = {a.node_id for a in list_actors(address=address, limit=1000) if a.class_name == "RayTrainWorker"}
    deadline = time.time() + 120  # idle_timeout_minutes 0.1: idle nodes go after ~6 s
    while time.time() < deadline and set(node_types().values()) != {"head"}:
        time.sleep(1)
    kind = {node: info["type"] for node, info in seen.items()}
    killed_at = results["slice_host_killed"].get("event", {}).get("killed_at", float("inf"))
    print(json.dumps({
        **results,
        "launched": sorted(set(kind.values()) - {"head"}),
        "data_work_on": sorted({kind.get(n, "unknown") for n in data_work}),
        "training_on": sorted({kind.get(n, "unknown") for n in trainers}),
        # Slice hosts that came up after the kill and trained: the autoscaler's replacement.
        "replacements_trained": sorted(kind[n] for n in trainers if n in seen and seen[n]["first_seen"] > killed_at),
        "alive_after_idle": sorted(set(node_types().values())),
    }))
    ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
