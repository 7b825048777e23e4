"""Weights & Biases logging of a run on the driver: config, metrics as they arrive, summary.

Without an API key (no WANDB_API_KEY, no `wandb login`) the run is logged offline into
the run directory and can be uploaded later with `wandb sync`; the key itself is never
read into raysft, let alone printed.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

# What a step or eval record becomes in wandb: train/loss, eval/perplexity, ...
_SECTION = {"step": "train", "eval": "eval"}
_SKIP = {"event", "step", "time", "mfu_peak"}


def wandb_mode() -> str:
    """WANDB_MODE if set, else online with a key and offline without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def wandb_values(record: dict[str, Any]) -> dict[str, float]:
    """What a step or eval record logs; per-source keys (`eval_loss/<name>`) keep their name,
    the rest go under the record's section (`train/rewards/margins`, `eval/rewards/margins`)."""
    section = _SECTION.get(record["event"])
    if section is None:
        return {}
    return {
        k if k.startswith("eval_") and "/" in k else f"{section}/{k}": v
        for k, v in record.items() if k not in _SKIP and isinstance(v, (int, float))
    }


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, project: str, entity: str | None, config: dict[str, Any]):
        import wandb

        mode = wandb_mode()
        if mode == "offline":
            print(f"wandb: no API key found; logging offline under {run_dir / 'wandb'} (upload later with `wandb sync`)")
        self.run = wandb.init(
            project=project, entity=entity, name=name, dir=str(run_dir), config=config, mode=mode, reinit="create_new"
        )

    def log(self, record: dict[str, Any]) -> None:
        values = wandb_values(record)
        if record["event"] == "generations":
            values = {"eval/generations": self._table(record)}
        if values:
            self.run.log(values, step=record["step"])

    @staticmethod
    def _table(record: dict[str, Any]):
        import wandb

        columns = ["step", "source", "prompt", "reference", "answer", "exact_match"]
        rows = [[record["step"], *(s.get(c) for c in columns[1:])] for s in record["samples"]]
        return wandb.Table(columns=columns, data=rows)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()

    def fail(self) -> None:
        self.run.finish(exit_code=1)
