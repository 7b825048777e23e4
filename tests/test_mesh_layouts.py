"""2 hosts x 2 CPU devices (two real JAX processes): every mesh layout follows the
1-device loss trajectory, and gradients on 2 hosts equal those on 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import save_tiny_model
from mesh_worker import LAYOUTS, run
from test_sharded_loading import _free_port


def test_layouts_follow_the_single_device_trajectory(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", vocab_size=96)
    worker = Path(__file__).with_name("mesh_worker.py")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(model_dir), str(tmp_path), coordinator, "2", str(rank)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    import jax

    reference, reference_grads = run(model_dir, (1, 1, 1, 1), devices=jax.devices()[:1])  # one device
    trajectories = json.loads((tmp_path / "losses.json").read_text())
    assert set(trajectories) == set(LAYOUTS) | {"two_slices"}
    slices = json.loads((tmp_path / "slices.json").read_text())
    assert slices == {"shape": {"dp": 2, "fsdp": 2, "tp": 1, "sp": 1}, "dp_processes": [[0], [1]]}
    for name, losses in trajectories.items():
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=name)
    assert reference[-1] < reference[0]

    two_hosts = np.load(tmp_path / "grads_2hosts.npz")
    for name, grad in reference_grads.items():
        np.testing.assert_allclose(two_hosts[name], grad, atol=1e-6 * np.abs(grad).max(), rtol=0, err_msg=name)
