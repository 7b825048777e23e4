"""2 hosts x 2 CPU devices (two real JAX processes): every mesh layout follows the
1-device loss trajectory, and gradients on 2 hosts equal those on 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import run_jax_processes, save_tiny_model
from mesh_worker import LAYOUTS, run


def test_layouts_follow_the_single_device_trajectory(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", vocab_size=96)
    results = run_jax_processes(Path(__file__).with_name("mesh_worker.py"), [model_dir, tmp_path], 2, 600)
    assert all(code == 0 for code, _ in results), "\n".join(out[-3000:] for _, out in results)

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
