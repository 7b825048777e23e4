"""`run.json`: what a run directory was trained from, so later commands (`raysft export`)
need nothing but the directory."""

from __future__ import annotations

import dataclasses
import json
from etils import epath

from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.redact import redact
from raysft.workers.models.source import ModelSource

RUN_FILE = "run.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    model: ModelSource  # pinned: an export loads what training loaded
    config: SFTConfig

    def write(self, run_dir: epath.Path) -> None:
        record = {
            "model": str(self.model),
            # Only what was set: defaults of a later raysft apply on reading, as they would on a
            # rerun. No secret: what reads it back (export, generate) reads no dataset.
            "config": redact(self.config.model_dump(mode="json", exclude_unset=True)),
        }
        (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: epath.Path) -> "RunRecord":
        path = run_dir / RUN_FILE
        if not path.is_file():
            raise ValueError(f"{run_dir} is not a raysft run directory: no {RUN_FILE} (train() writes it)")
        record = json.loads(path.read_text())
        # Runs before model sources recorded the local directory as "model_dir".
        return cls(ModelSource.parse(record.get("model") or record["model_dir"]), SFTConfig(**record["config"]))
