"""`ray job submit` against a real Ray cluster started with `ray start --head` on
127.0.0.1: the run is submitted as a job with a checkout as its working dir, succeeds,
and leaves its checkpoint and export; a driver on that machine joins that cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CORPUS, RAY_LINES, copy_checkout, free_port, write_jsonl

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def head_node(tmp_path, monkeypatch):
    """A head node of its own (own temp dir and ports), stopped by ending its process:
    `ray stop` would stop every Ray on the machine. Token auth is off for this
    localhost-only cluster, in the head and in every client here."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port, dashboard = free_port(), free_port()
    # Ray's temp dir under a base of its own: clients with RAY_TMPDIR=base find this head
    # as they would find a `ray start` cluster in /tmp/ray.
    base = Path("/tmp") / f"raysft-job-{os.getpid()}"
    temp_dir = base / "ray"
    head = subprocess.Popen(
        RAY + ["start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=8", "--include-dashboard=true",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               # The test session's own Ray holds the default agent ports on this machine.
               *(f"--{name}={free_port()}" for name in (
                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                   "runtime-env-agent-port", "ray-client-server-port"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            # Written once the node is fully up, which can be after the dashboard answers.
            up = (temp_dir / "ray_current_cluster").is_file()
        except Exception:
            up = False
        if up:
            break
        if head.poll() is not None or time.monotonic() > deadline:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError(f"ray start --head did not come up:\n{head.stdout.read()[-3000:]}")
        time.sleep(1)
    yield address, base, port
    os.killpg(head.pid, signal.SIGTERM)  # `--block` stops the node's processes when ended
    try:
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:  # a graceful stop can take half a minute; the node is ours alone
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
    shutil.rmtree(base, ignore_errors=True)


def test_driver_joins_a_ray_start_cluster_on_this_machine(head_node):
    _, base, port = head_node
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(base)}
    script = (
        "import ray; from raysft.orchestrator.cluster import connect; connect(num_hosts=2); "
        "print('gcs', ray.get_runtime_context().gcs_address)"
    )
    joined = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert joined.stdout.split()[-1].endswith(f":{port}"), joined.stderr[-3000:]  # the head's GCS, by whichever IP it reports
    assert "Connected to Ray cluster" in joined.stderr


def test_ray_job_submit_trains_and_exports(head_node, tmp_path, tiny_model_dir):
    head_node, _, _ = head_node
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": CORPUS[i % len(CORPUS)]} for i in range(32)])
    runs = tmp_path / "runs"
    # The job ships this checkout as its working dir (`--working-dir .` in the README).
    checkout = copy_checkout(tmp_path / "checkout")
    command = (
        RAY + ["job", "submit", "--address", head_node, "--submission-id", "raysft-test", "--working-dir", str(checkout), "--",
               sys.executable, "-m", "raysft.orchestrator.sft", "--repo_id", str(tiny_model_dir),
               "--dataset_name", str(data), "--save_directory", str(runs), "--model_name", "job",
               "--max_sequence_length", "64", "--total_batch_size", "8", "--num_hosts", "2",
               "--max_training_steps", "3", "--save_steps", "2", "--log_steps", "1"]
    )
    # The dashboard answers before its job agent has registered; Ray says to retry.
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "Job 'raysft-test' succeeded" in submit.stdout

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node)
    assert client.get_job_status("raysft-test") == JobStatus.SUCCEEDED
    logs = client.get_job_logs("raysft-test")
    assert "step     3" in logs and "exported:" in logs
    # After Ray Jobs' own lines, the driver's: raysft's only (Ray's are in the run's logs/).
    driver = logs.split("Running entrypoint for job raysft-test: ", 1)[1]
    assert not RAY_LINES.search(driver), logs
    assert "Connected to Ray cluster" in (runs / "job" / "logs" / "ray.log").read_text()
    run_dir = runs / "job"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert (run_dir / "export" / "config.json").is_file() and list((run_dir / "export").glob("*.safetensors"))
    assert (run_dir / "report" / "loss.png").is_file()
