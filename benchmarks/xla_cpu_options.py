"""XLA:CPU's options on W1's bare train step (`train_throughput.py`'s step on one device):
jaxlib's defaults, raysft's (`workers/xla_cpu.py`), and each kind of YNNPACK fusion on its
own, each in a fresh process (XLA reads its flags once), in alternated rounds of one run.

    python benchmarks/xla_cpu_options.py [--rounds 3] [--steps 3]

Real tokens/s per option: the median over rounds; the ratio of raysft's options over the
defaults, per round and its median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.xla_cpu import cpu_xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"
OPTIONS = {
    "jaxlib_defaults": "",
    "raysft": cpu_xla_flags(""),
    "ynn_dot_only": f"{YNN}=dot",
    "ynn_eltwise_only": f"{YNN}=eltwise",
    "ynn_reduce_only": f"{YNN}=reduce",
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


def tokens_per_second(flags: str, steps: int) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    code = ONE_RUN.format(here=str(Path(__file__).parent), steps=steps)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    s = Settings()
    measured: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(s.rounds):
        for name, flags in OPTIONS.items():
            measured[name].append(tokens_per_second(flags, s.steps))
    ratios = [r / d for r, d in zip(measured["raysft"], measured["jaxlib_defaults"])]
    print(json.dumps({
        "benchmark": "xla_cpu_options W1 bare step",
        "raysft_flags": cpu_xla_flags(""),
        "real_tokens_per_s_median": {name: round(statistics.median(v), 1) for name, v in measured.items()},
        "raysft_over_defaults_per_round": [round(r, 3) for r in ratios],
        "raysft_over_defaults_median": round(statistics.median(ratios), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
