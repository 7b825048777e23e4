"""`run.json`: what a run directory was trained from, so later commands (`raysft export`)
need nothing but the directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from raysft.orchestrator.config import SFTConfig

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    model_dir: Path
    config: SFTConfig

    def write(self, run_dir: Path) -> None:
        record = {
            "model_dir": str(Path(self.model_dir).absolute()),
            # Only what was set: defaults of a later raysft apply on reading, as they would on a rerun.
            "config": self.config.model_dump(mode="json", exclude_unset=True),
        }
        (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> "RunRecord":
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise ValueError(f"{run_dir} is not a raysft run directory: no {RUN_FILE} (train() writes it)")
        record = json.loads(path.read_text())
        return cls(Path(record["model_dir"]), SFTConfig(**record["config"]))
