"""A raysft run through Ray's own autoscaler (v2, its fake multi-node provider): CPU nodes
come up for data preparation, a TPU slice's hosts for training, a killed slice host is
replaced and the run resumes bit-identically, and everything idle goes again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).parent


def _kill_session(sid: int) -> None:
    """Every process of session `sid`: the script, and the cluster `ray start` left behind."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass


def test_autoscaler_brings_up_data_nodes_and_a_slice_replaces_a_killed_host_and_scales_down(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "autoscaling_worker.py"), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        stdout, stderr = "", "timed out"
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    whole, killed = result["uninterrupted"], result["slice_host_killed"]
    assert "error" not in whole and "error" not in killed, (whole.get("error"), killed.get("error"))

    # From a head without CPUs: CPU nodes for the data work (never a slice host), one
    # worker per slice host for training.
    assert result["launched"] == ["cpu_data", "slice_host_0", "slice_host_1"], result
    assert set(result["data_work_on"]) <= {"cpu_data", "head"} and "cpu_data" in result["data_work_on"], result
    assert result["training_on"] == ["slice_host_0", "slice_host_1"], result
    assert whole["summary"]["process_count"] == 2

    # Slice host 1 killed after a checkpoint: the autoscaler's replacement trains the
    # resumed attempt, which starts from the latest checkpoint in the bucket and ends
    # where the uninterrupted run did, bit for bit.
    restarts = [r for r in killed["records"] if r["event"] == "restart"]
    assert [r["kind"] for r in restarts] == ["failure"], restarts
    starts = [r["start_step"] for r in killed["records"] if r["event"] == "start"]
    assert starts[0] == 0 and starts[1] >= max(killed["event"]["checkpoints_at_kill"]) >= 8, (starts, killed["event"])
    assert "slice_host_1" in result["replacements_trained"], result
    assert killed["summary"]["final_step"] == whole["summary"]["final_step"] == 20
    a = load_file(Path(whole["export_dir"]) / "model.safetensors")
    b = load_file(Path(killed["export_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name

    # Idle nodes go once the runs are over.
    assert result["alive_after_idle"] == ["head"], result
