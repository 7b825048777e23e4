"""Runs on a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, one
training worker per node): an uninterrupted run, a run whose worker node is killed and
replaced mid-training, and a run whose node is drained for preemption.

Run as `python fault_scenarios.py OUT_DIR [SCENARIO ...]`; writes OUT_DIR/results.json.
A separate process, so its cluster never meets the test session's embedded Ray.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# Ray Train polls for node drains every 5 s by default; the cluster's processes inherit this.
os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import CORPUS, save_tiny_model, train_tokenizer, write_jsonl  # noqa: E402

import raysft as rs  # noqa: E402

HOST = {"num_cpus": 1, "resources": {"raysft_host": 1}}
SAVE_STEPS = 5
STEPS = 60


def config(save_directory: Path, **overrides) -> rs.SFTConfig:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_steps(run_dir: Path) -> list[int]:
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def wait_for_checkpoint(run_dir: Path, step: int, done: threading.Event) -> bool:
    """Wait until a checkpoint at or after `step` is committed (False if training ended first)."""
    while not any(s >= step for s in checkpoint_steps(run_dir)):
        if done.is_set():
            return False
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # an arbitrary step, not the checkpoint's
    return True


def train(runs_dir: Path, name: str, model_dir: Path, data_dir: Path, interrupt=None, **overrides) -> dict:
    """Train in a thread; the main thread (which Ray needs to start nodes) interrupts it."""
    cfg = config(runs_dir / name, **overrides)
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
    if interrupt and wait_for_checkpoint(cfg.run_dir, 2 * SAVE_STEPS, done):
        try:
            interrupt(event, cfg.run_dir)
        except Exception as err:  # training still ends; the test reports this
            event["error"] = f"{type(err).__name__}: {err}"
    thread.join()
    if "error" in result:
        return {"error": result["error"], "event": event}
    out = result["out"]
    return {
        "seconds": time.perf_counter() - started,
        "summary": {k: v for k, v in out.summary.items() if k != "spec"},
        "records": out.metrics,
        "export_dir": str(out.export_dir),
        "event": event,
    }


SCENARIOS = ("uninterrupted", "node_killed", "node_drained")


def run_scenarios(out_dir: Path, scenarios=SCENARIOS, **overrides) -> dict:
    """Each scenario's summary, metric records and interruption; `no_checkpoints` is an
    uninterrupted run that never saves (the baseline of the save overhead)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "model"
    tokenizer = train_tokenizer(model_dir)
    save_tiny_model(model_dir, len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32)
    data_dir = out_dir / "data"
    data_dir.mkdir(exist_ok=True)
    write_jsonl(data_dir / "train.jsonl", [{"text": " ".join(CORPUS[i % 6 :] + CORPUS[: i % 6])} for i in range(64)])

    cluster = Cluster(
        initialize_head=True,
        # Its own dashboard port: the test session's embedded Ray holds the default one.
        head_node_args={"num_cpus": 4, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()},
    )
    nodes = [cluster.add_node(**HOST) for _ in range(2)]
    ray.init(address=cluster.address)
    results = {}

    def kill(event: dict, run_dir: Path) -> None:
        event["checkpoints_at_kill"] = checkpoint_steps(run_dir)
        victim = nodes.pop()
        event["killed_at"] = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        nodes.append(cluster.add_node(**HOST))  # the replacement the autoscaler would bring

    def drain(event: dict, run_dir: Path) -> None:
        victim = nodes.pop()
        event["drained_at"] = time.time()
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address, "--node-id", victim.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
             "--deadline-remaining-seconds", "60"],
            check=True,
        )
        nodes.append(cluster.add_node(**HOST))  # a drained node takes no new work
        event["drained_node"] = victim.node_id

    try:
        for name in scenarios:
            interrupt = {"node_killed": kill, "node_drained": drain}.get(name)
            extra = dict(save_steps=None, do_last_save=False) if name == "no_checkpoints" else {}
            results[name] = train(out_dir / "runs", name, model_dir, data_dir, interrupt, **overrides, **extra)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = run_scenarios(out, sys.argv[2:] or SCENARIOS)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
