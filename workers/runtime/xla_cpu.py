"""The environment raysft's CPU workers run with (and the benchmarks' bare steps, so that
they time the same code): XLA:CPU's options and glibc's allocator tunables."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# jaxlib 0.10 hands XLA:CPU's dots, reductions and elementwise fusions to YNNPACK by
# default. W1's train step runs 1.16-1.4x faster without any of them, and no kind of
# them on its own is faster than none (`python benchmarks/xla_cpu_options.py`).
OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# XLA:CPU allocates an executable's temporaries anew on every run (1.2 GB for W1's
# step), and glibc maps an allocation that large fresh from the kernel each time: W1's
# step faulted in ~335,000 4 KiB pages, a third of its time in the kernel. With
# `hugetlb=1` malloc asks for transparent huge pages on such mappings (about 500 faults
# per 1 GB); the step runs ~1.4x faster (`python benchmarks/xla_cpu_options.py`).
# glibc reads its tunables only where a program starts.
GLIBC_TUNABLES = {"glibc.malloc.hugetlb": "1"}


def _with_ours(given: list[str], ours: Mapping[str, str], name_of, render) -> list[str]:
    """`given` settings with ours appended, except those the user set there (theirs win)."""
    named = {name_of(setting) for setting in given}
    return given + [render(name, value) for name, value in ours.items() if name not in named]


def cpu_xla_flags(flags: str | None) -> str:
    """An XLA_FLAGS value: `flags` with raysft's XLA:CPU options added, except any the
    user set there (theirs win)."""
    return " ".join(_with_ours(
        (flags or "").split(), OPTIONS, lambda flag: flag.lstrip("-").split("=", 1)[0], lambda n, v: f"--{n}={v}"
    ))


def cpu_glibc_tunables(tunables: str | None) -> str:
    """A GLIBC_TUNABLES value (`name=value:name=value`): `tunables` with raysft's added,
    except any the user set there (theirs win)."""
    return ":".join(_with_ours(
        [t for t in (tunables or "").split(":") if t], GLIBC_TUNABLES,
        lambda tunable: tunable.split("=", 1)[0], lambda n, v: f"{n}={v}",
    ))


def cpu_worker_env() -> dict[str, str]:
    """The variables a CPU worker process starts with, given this (the driver's) environment."""
    return {
        "XLA_FLAGS": cpu_xla_flags(os.environ.get("XLA_FLAGS")),
        "GLIBC_TUNABLES": cpu_glibc_tunables(os.environ.get("GLIBC_TUNABLES")),
    }


def use_cpu_xla_flags() -> None:
    """Apply the XLA options to this process; XLA reads its flags once, when the first
    backend starts."""
    os.environ["XLA_FLAGS"] = cpu_xla_flags(os.environ.get("XLA_FLAGS"))


def run_as_cpu_worker() -> None:
    """Make this process run as a CPU worker does: the XLA options now, and glibc's
    tunables by starting this program again with them (once; nothing else has run yet
    that the restart would repeat, where this is the first thing a script's `main` does)."""
    env = cpu_worker_env()
    if os.environ.get("GLIBC_TUNABLES") != env["GLIBC_TUNABLES"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
    os.environ.update(env)
