"""The XLA:CPU options raysft's CPU workers run with (`workers/xla_cpu.py`)."""

from __future__ import annotations

import os
import subprocess
import sys

from raysft.orchestrator.worker_group import worker_env

COMPILE = """
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jax.nn.relu(a @ b).sum(-1))
print("ynn_fusion" in f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text())
"""


def _compiles_with_ynnpack(env: dict[str, str]) -> bool:
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1] == "True"


def test_cpu_workers_compile_without_ynnpack_fusions(monkeypatch):
    """A CPU worker's environment turns off the YNNPACK fusions jaxlib's XLA:CPU makes by
    default (benchmarks/xla_cpu_options.py: the train step is faster without them)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    defaults = dict(os.environ)
    assert _compiles_with_ynnpack({**defaults, "JAX_PLATFORMS": "cpu"})
    assert not _compiles_with_ynnpack({**defaults, **worker_env(cpu=True)})


def test_the_users_xla_flags_are_kept_and_theirs_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dumps")
    assert worker_env(cpu=True)["XLA_FLAGS"] == "--xla_dump_to=/tmp/dumps --xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/dumps")
    assert worker_env(cpu=True)["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot --xla_dump_to=/tmp/dumps"
    assert "XLA_FLAGS" not in worker_env(cpu=False)  # GPU and TPU workers keep the node's own
