"""Runs on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, one
training worker per node, each node with its own cache): an uninterrupted run, and a run
on object storage (a real S3-compatible server on 127.0.0.1) that loses a node twice:
one drained for preemption, later one killed and replaced mid-training.

Run as `python fault_scenarios.py OUT_DIR [SCENARIO ...]`; writes OUT_DIR/results.json.
A separate process, so its cluster never meets the test session's embedded Ray.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

# Ray Train polls for node drains every 5 s by default; the cluster's processes inherit this.
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CORPUS, free_port, save_tiny_model, serve_bucket, train_tokenizer, write_jsonl  # noqa: E402

import raysft as rs  # noqa: E402
from raysft.storage.locations import local_copy  # noqa: E402
from raysft.orchestrator.export import checkpoint_steps, export_checkpoint  # noqa: E402

def host(out_dir: Path) -> dict:
    """A training node with its own cache (as its own disk would be): what it reads of a
    run on object storage it fetches itself."""
    cache = out_dir / "node-caches" / uuid.uuid4().hex[:8]
    return {"num_cpus": 1, "resources": {"raysft_host": 1}, "env_vars": {"RAYSFT_CACHE": str(cache)}}
SAVE_STEPS = 5
STEPS = 30


def config(save_directory: str, **overrides) -> rs.SFTConfig:
    settings = dict(
        model_name="fault",
        save_directory=str(save_directory),
        max_sequence_length=128,
        total_batch_size=8,
        num_hosts=2,
        cpu_devices_per_host=2,
        worker_resources={"CPU": 1, "raysft_host": 1},
        learning_rate=3e-3,
        max_training_steps=STEPS,
        num_train_epochs=100,
        save_steps=SAVE_STEPS,
        log_steps=1,
        max_restarts=2,
        max_preemption_restarts=2,
    )
    return rs.SFTConfig(**{**settings, **overrides})


def wait_for_checkpoint(run_dir, step: int, done: threading.Event) -> bool:
    """Wait until a checkpoint at or after `step` is committed (False if training ended first)."""
    while not any(s >= step for s in checkpoint_steps(run_dir)):
        if done.is_set():
            return False
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.3))  # an arbitrary step, not the checkpoint's
    return True


def train(runs_dir: str, name: str, model_dir: Path, data_dir: Path, interrupts=(), **overrides) -> dict:
    """Train in a thread; the main thread (which Ray needs to start nodes) interrupts it:
    each of `interrupts` (checkpoint step, action) once a checkpoint at or after its step
    is committed."""
    cfg = config(f"{runs_dir}/{name}", **overrides)
    event: dict = {}
    result: dict = {}
    done = threading.Event()

    def run():
        try:
            result["out"] = rs.SFTTrainer(
                arguments=cfg, model=model_dir, train_dataset=data_dir / "train.jsonl", quiet=True
            ).train()
        except BaseException as err:  # reported by the test
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            done.set()

    started = time.perf_counter()
    thread = threading.Thread(target=run)
    thread.start()
    for step, interrupt in interrupts:
        if not wait_for_checkpoint(cfg.run_dir, step, done):
            break
        try:
            interrupt(event, cfg.run_dir)
        except Exception as err:  # training still ends; the test reports this
            event["error"] = f"{type(err).__name__}: {err}"
            break
    thread.join()
    if "error" in result:
        return {"error": result["error"], "event": event}
    out = result["out"]
    return {
        "seconds": time.perf_counter() - started,
        "summary": {k: v for k, v in out.summary.items() if k != "spec"},
        "records": out.metrics,
        # A local copy of an export on object storage, for the test to read after the server is gone.
        "export_dir": str(local_copy(out.export_dir)),
        "run_dir": str(out.run_dir),
        "event": event,
    }


SCENARIOS = ("uninterrupted", "node_drained_then_killed_s3")
BUCKET = "raysft-runs"


def bucket_files() -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def run_scenarios(out_dir: Path, scenarios=SCENARIOS, architecture: str = "qwen3_moe", **overrides) -> dict:
    """Each scenario's summary, metric records and interruption; `no_checkpoints` is an
    uninterrupted run that never saves (the baseline of the save overhead). The model: a
    tiny mixture of experts, its 4 experts split over the 2 hosts' 4 devices, so every
    step sends tokens between the hosts and each restart rebuilds that expert-parallel
    mesh (`architecture` "llama": a dense one of the same width)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["RAYSFT_CACHE"] = str(out_dir / "driver-cache")  # the driver's own disk, not the user's cache
    model_dir = out_dir / "model"
    tokenizer = train_tokenizer(model_dir)
    experts = {"moe_intermediate_size": 64} if architecture == "qwen3_moe" else {}
    save_tiny_model(model_dir, len(tokenizer), architecture, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    head_dim=32, **experts)
    data_dir = out_dir / "data"
    data_dir.mkdir(exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", [{"text": " ".join(CORPUS[i % 6 :] + CORPUS[: i % 6])} for i in range(64)])

    cluster = Cluster(
        initialize_head=True,
        # Its own dashboard port: the test session's embedded Ray holds the default one.
        head_node_args={"num_cpus": 4, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()},
    )
    nodes = [cluster.add_node(**host(out_dir)) for _ in range(2)]
    ray.init(address=cluster.address)
    # The driver's environment points at the server, the nodes' does not: raysft passes it on.
    object_runs = f"{serve_bucket(BUCKET)}/runs" if any(name.endswith("_s3") for name in scenarios) else None
    results = {}

    def kill(event: dict, run_dir) -> None:
        event["checkpoints_at_kill"] = checkpoint_steps(run_dir)
        victim = nodes.pop()
        event["killed_at"] = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        nodes.append(cluster.add_node(**host(out_dir)))  # the replacement the autoscaler would bring

    def drain(event: dict, run_dir) -> None:
        victim = nodes.pop()
        event["drained_at"] = time.time()
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address, "--node-id", victim.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
             "--deadline-remaining-seconds", "60"],
            check=True,
        )
        nodes.append(cluster.add_node(**host(out_dir)))  # a drained node takes no new work
        event["drained_node"] = victim.node_id

    try:
        for name in scenarios:
            # node_killed and node_drained: one interruption on local storage
            # (benchmarks/recovery.py times node_killed).
            interrupts = {
                "node_killed": [(2 * SAVE_STEPS, kill)], "node_drained": [(2 * SAVE_STEPS, drain)],
                "node_drained_then_killed_s3": [(2 * SAVE_STEPS, drain), (4 * SAVE_STEPS, kill)],
            }.get(name, [])
            extra = dict(save_steps=None, do_last_save=False) if name == "no_checkpoints" else {}
            runs = object_runs if name.endswith("_s3") else str(out_dir / "runs")
            results[name] = train(runs, name, model_dir, data_dir, interrupts, **overrides, **extra)
        on_s3 = results.get("node_drained_then_killed_s3", {})
        if on_s3 and "error" not in on_s3:
            # `raysft export` of the run's latest checkpoint, all from the bucket.
            on_s3["exported_latest"] = str(local_copy(export_checkpoint(on_s3["run_dir"])))
            on_s3["bucket_files"] = bucket_files()
            on_s3["node_caches"] = {
                node.name: sorted(c.name for c in (node / "copies").glob("*") if c.is_dir())
                for node in (out_dir / "node-caches").iterdir()
            }
    finally:
        ray.shutdown()
        cluster.shutdown()
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = run_scenarios(out, sys.argv[2:] or SCENARIOS)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
