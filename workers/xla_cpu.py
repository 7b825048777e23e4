"""The XLA:CPU options raysft's CPU workers compile with (and the benchmarks' bare steps,
so that they time the same code)."""

from __future__ import annotations

import os

# jaxlib 0.10 hands XLA:CPU's dots, reductions and elementwise fusions to YNNPACK by
# default. W1's train step runs 1.16-1.4x faster without any of them, and no kind of
# them on its own is faster than none (`python benchmarks/xla_cpu_options.py`).
OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_xla_flags(flags: str | None) -> str:
    """An XLA_FLAGS value: `flags` with raysft's XLA:CPU options added, except any the
    user set there (theirs wins)."""
    given = (flags or "").split()
    named = {flag.lstrip("-").split("=", 1)[0] for flag in given}
    return " ".join(given + [f"--{name}={value}" for name, value in OPTIONS.items() if name not in named])


def use_cpu_xla_flags() -> None:
    """Apply them to this process; XLA reads its flags once, when the first backend starts."""
    os.environ["XLA_FLAGS"] = cpu_xla_flags(os.environ.get("XLA_FLAGS"))
