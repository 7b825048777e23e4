"""The CPU workers' options on W1's bare train step (`train_throughput.py`'s step on one
device): XLA:CPU's and glibc's defaults, raysft's (`workers/runtime/xla_cpu.py`), each of raysft's
two changes alone, and each kind of YNNPACK fusion on its own (with raysft's glibc
tunables), each in a fresh process (XLA reads its flags once, glibc its tunables where a
program starts), in alternated rounds of one run.

    python benchmarks/xla_cpu_options.py [--rounds 3] [--steps 3]

Real tokens/s per option: the median over rounds; the ratios of raysft's options over the
defaults and over each of its changes alone, per round and their medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import cpu_glibc_tunables, cpu_xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"
HUGE_PAGES = cpu_glibc_tunables("")
# option: (XLA_FLAGS, GLIBC_TUNABLES)
OPTIONS = {
    "defaults": ("", ""),
    "raysft": (cpu_xla_flags(""), HUGE_PAGES),
    "raysft_xla_options_only": (cpu_xla_flags(""), ""),
    "raysft_glibc_tunables_only": ("", HUGE_PAGES),
    "ynn_dot_only": (f"{YNN}=dot", HUGE_PAGES),
    "ynn_eltwise_only": (f"{YNN}=eltwise", HUGE_PAGES),
    "ynn_reduce_only": (f"{YNN}=reduce", HUGE_PAGES),
}
ONE_RUN = """
import sys
sys.path.insert(0, {here!r})
from train_throughput import Settings, packed_batches, run_raysft
s = Settings(steps={steps}, warmup_steps=1, _cli_parse_args=False)
batches = packed_batches(s)
print(sum(int((b["segment_ids"] > 0).sum()) for b in batches[s.warmup_steps:]) / run_raysft(s, batches))
"""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="xla_cpu_options.py")

    rounds: int = 3
    steps: int = 3


def tokens_per_second(flags: str, tunables: str, steps: int) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "GLIBC_TUNABLES": tunables}
    code = ONE_RUN.format(here=str(Path(__file__).parent), steps=steps)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    s = Settings()
    measured: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(s.rounds):
        for name, (flags, tunables) in OPTIONS.items():
            measured[name].append(tokens_per_second(flags, tunables, s.steps))
    ratios = {
        f"raysft_over_{other}": [r / o for r, o in zip(measured["raysft"], measured[other])]
        for other in ("defaults", "raysft_xla_options_only", "raysft_glibc_tunables_only")
    }
    print(json.dumps({
        "benchmark": "xla_cpu_options W1 bare step",
        "raysft_xla_flags": cpu_xla_flags(""),
        "raysft_glibc_tunables": HUGE_PAGES,
        "real_tokens_per_s_median": {name: round(statistics.median(v), 1) for name, v in measured.items()},
        **{f"{name}_per_round": [round(r, 3) for r in v] for name, v in ratios.items()},
        **{f"{name}_median": round(statistics.median(v), 3) for name, v in ratios.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
