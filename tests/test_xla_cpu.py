"""The environment raysft's CPU workers run with (`workers/runtime/xla_cpu.py`): XLA:CPU's options, glibc's tunables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_the_users_glibc_tunables_are_kept_and_theirs_win(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert worker_env(cpu=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert worker_env(cpu=True)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2")
    assert worker_env(cpu=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
    assert "GLIBC_TUNABLES" not in worker_env(cpu=False)


# XLA:CPU's temporaries come from malloc; numpy would ask for huge pages itself.
LARGE_MALLOC = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
ctypes.memset(libc.malloc(size), 1, size)
print([int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0])
"""


def _huge_page_kib(env: dict[str, str]) -> int:
    proc = subprocess.run([sys.executable, "-c", LARGE_MALLOC], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_cpu_workers_get_huge_pages_for_large_allocations(monkeypatch):
    """With the workers' glibc tunables, malloc asks for transparent huge pages where it
    maps a large allocation (XLA:CPU's temporaries, mapped anew on every run of a step),
    so the kernel faults them in 2 MiB at a time instead of 4 KiB."""
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" in mode:
        pytest.skip(f"this kernel gives no transparent huge pages: {mode.strip()}")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert _huge_page_kib({**os.environ, **worker_env(cpu=True)}) >= 128 << 10
    if "[madvise]" in mode:  # huge pages only where a program asks for them
        assert _huge_page_kib(dict(os.environ)) == 0


RESTARTS = """
import os
from raysft.workers.runtime.xla_cpu import run_as_cpu_worker
print("started", flush=True)
run_as_cpu_worker()
started_with = dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\\0") if "=" in v)
print(started_with["GLIBC_TUNABLES"], "|", os.environ["XLA_FLAGS"])
"""


def test_a_benchmark_restarts_once_to_run_as_a_cpu_worker(monkeypatch):
    """glibc reads its tunables only where a program starts: `run_as_cpu_worker` starts
    the program again with them, once."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    proc = subprocess.run([sys.executable, "-c", RESTARTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "started", "started", "glibc.malloc.hugetlb=1 | --xla_cpu_experimental_ynn_fusion_type=",
    ]


def test_ray_starts_a_cpu_worker_with_the_tunables(local_ray, monkeypatch):
    """Ray sets a worker's `env_vars` before the process starts, so glibc reads them."""
    import ray

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)

    @ray.remote(num_cpus=0)
    def started_with() -> dict[str, str]:
        return dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\0") if "=" in v)

    env = ray.get(started_with.options(runtime_env={"env_vars": worker_env(cpu=True)}).remote())
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["XLA_FLAGS"] == worker_env(cpu=True)["XLA_FLAGS"]
