"""Every host must read the run directory and the model where the driver does: checked on
each node before any data is prepared, and by each worker when it starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS, write_jsonl
from raysft.storage.shared_storage import StorageNotShared, require_what_the_driver_sees, write_marker

TESTS = Path(__file__).parent


def test_a_node_with_its_own_disk_is_refused_before_any_work(tmp_path, tiny_model_dir):
    if shutil.which("unshare") is None or subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    ).returncode:
        pytest.skip("needs mount namespaces (unshare) to give one node a disk of its own")
    save_dir, shared_dir = tmp_path / "local_runs", tmp_path / "shared_runs"
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    save_dir.mkdir()
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in CORPUS])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, str(TESTS / "node_check_worker.py"), str(save_dir), str(model_dir), str(shared_dir), str(data)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith('{"local_save_directory"')))
    assert result["local_save_directory"].startswith(
        f"save_directory {save_dir} is not the driver's storage on host "
    )
    assert result["local_save_directory"].endswith(
        "is missing or from another run): with more than one node it must be storage every host sees "
        "(s3:// or gs://, or a shared filesystem mounted at the same path on every host)"
    )
    assert result["local_model"].startswith(f"model {model_dir} is not on host ")
    assert "must be on storage every host sees" in result["local_model"]
    assert "\n" not in result["local_save_directory"] + result["local_model"]
    assert result["prepared"] == []  # refused before any data was prepared


def test_a_worker_that_does_not_see_the_drivers_marker_stops(tmp_path, tiny_model_dir):
    marker = write_marker(tmp_path)
    require_what_the_driver_sees(marker, str(tiny_model_dir))  # the driver's own host sees it
    stale = (marker[0], "a token of an earlier run")
    with pytest.raises(StorageNotShared, match=rf"^save_directory {tmp_path.parent} is not the driver's storage"):
        require_what_the_driver_sees(stale, str(tiny_model_dir))
    with pytest.raises(StorageNotShared, match=rf"^model {tmp_path / 'gone'} is not on host "):
        require_what_the_driver_sees(marker, str(tmp_path / "gone"))
