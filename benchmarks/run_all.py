"""Run every benchmark, each in its own process, and print one table of their results.

    python benchmarks/run_all.py      (or `make bench`)

Each benchmark prints one JSON object as its last output; its ratios compare against a
baseline measured in the same run, so they hold on a noisy shared machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = [
    "model_step.py", "moe_step.py", "dpo_step.py", "train_throughput.py", "xla_cpu_options.py", "step_profile.py", "attention.py",
    "loss_head.py", "trainer_throughput.py", "lora_step.py", "quantized_base_loss.py", "generation.py", "data_pipeline.py",
    "recovery.py",
]


def last_json_object(stdout: str) -> dict:
    """The JSON object a benchmark printed last (Ray and JAX log around it)."""
    end = stdout.rindex("}")
    depth = 0
    for start in range(end, -1, -1):
        depth += {"}": 1, "{": -1}.get(stdout[start], 0)
        if depth == 0:
            return json.loads(stdout[start : end + 1])
    raise ValueError("no JSON object in the output")


def rows(result: dict, prefix: str = ""):
    for key, value in result.items():
        if key == "benchmark":
            continue
        if isinstance(value, dict):
            yield from rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main() -> int:
    table, failed = [], []
    for name in BENCHMARKS:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / name)], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            failed.append(name)
            print(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        result = last_json_object(proc.stdout)
        table += [(result.get("benchmark", name), key, value) for key, value in rows(result)]
        table.append((result.get("benchmark", name), "wall_seconds", round(seconds, 1)))
    width = [max(len(str(row[i])) for row in table) for i in range(2)] if table else [0, 0]
    print(f"{'benchmark':<{width[0]}}  {'metric':<{width[1]}}  value")
    for bench, key, value in table:
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{bench:<{width[0]}}  {key:<{width[1]}}  {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
