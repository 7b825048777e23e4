"""Recovery on a multi-node Ray cluster of this machine (one training worker per node):
the time from a worker node's death to the next completed training step, the steps
lost, and what asynchronous checkpointing costs per step, all from one run.

The run: a random Llama (hidden 128, 4 layers), T = 128, batch 8 over 2 hosts x 2 CPU
devices, 60 steps, a checkpoint every 5 steps; a node is killed at an arbitrary step
after step 10 and a replacement node added, as an autoscaler would. The save overhead
compares steady-state step times with and without checkpoints in the same run.

    python benchmarks/recovery.py [--out /tmp/raysft-recovery]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fault_scenarios import SAVE_STEPS, run_scenarios  # noqa: E402


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="recovery.py")

    out: Path | None = None


def steady_step_time(records: list[dict]) -> float:
    """Mean step time after the first few steps (compilation), saving steps included."""
    return statistics.mean(r["step_time_s"] for r in records if r["event"] == "step" and r["step"] > 3)


def recovery(result: dict) -> dict:
    records, killed_at = result["records"], result["event"]["killed_at"]
    restart = next(i for i, r in enumerate(records) if r["event"] == "restart")
    before = [r for r in records[:restart] if r["event"] == "step" and r["time"] <= killed_at]
    resumed_at = next(r["start_step"] for r in records[restart:] if r["event"] == "start")
    first_step = next(r for r in records[restart:] if r["event"] == "step")
    return {
        "killed_after_step": before[-1]["step"],
        "resumed_from_step": resumed_at,
        "steps_lost": before[-1]["step"] - resumed_at,
        "seconds_to_next_step": first_step["time"] - killed_at,
    }


def exported(result: dict) -> dict[str, bytes]:
    from safetensors.numpy import load_file

    files = sorted(Path(result["export_dir"]).glob("*.safetensors"))
    return {name: array.tobytes() for file in files for name, array in load_file(file).items()}


def main() -> None:
    s = Settings()
    out = s.out or Path(tempfile.mkdtemp(prefix="raysft-recovery-"))
    results = run_scenarios(out, ("no_checkpoints", "uninterrupted", "node_killed"), architecture="llama")
    for name, result in results.items():
        if "error" in result:
            raise SystemExit(f"{name}: {result['error']}")
    with_saves = steady_step_time(results["uninterrupted"]["records"])
    without = steady_step_time(results["no_checkpoints"]["records"])
    report = {
        "benchmark": "recovery (2 hosts x 2 CPU devices, tiny Llama, 60 steps)",
        **recovery(results["node_killed"]),
        "save_every_steps": SAVE_STEPS,
        "step_time_s_without_checkpoints": without,
        "step_time_s_with_checkpoints": with_saves,
        "async_save_overhead_pct_of_step_time": 100 * (with_saves - without) / without,
        "seconds_per_save": (with_saves - without) * SAVE_STEPS,
        "final_params_bit_identical": exported(results["uninterrupted"]) == exported(results["node_killed"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
