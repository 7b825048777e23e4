"""`raysft sft` / `python -m raysft.orchestrator.sft`: the seed's command line, via pydantic-settings."""

from __future__ import annotations

import sys

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from raysft.orchestrator.config import SFTConfig

_LAUNCH_FIELDS = {"config", "repo_id", "dataset_name", "eval_dataset_name"}


class SFTCommand(BaseSettings, SFTConfig):
    """Fine-tune a model: every SFTConfig field is a flag; --config loads a YAML first."""

    model_config = SettingsConfigDict(
        cli_prog_name="raysft sft", cli_implicit_flags=False, extra="forbid", frozen=True
    )

    config: str | None = Field(None, description="YAML file of SFTConfig fields; flags override it.")
    repo_id: str = Field(description="Model: a Hugging Face directory, a .gguf file or a hub repo id.")
    dataset_name: str = Field(description="Training data: a .jsonl or .parquet file.")
    eval_dataset_name: str | None = Field(None, description="Held-out data, evaluated before and after.")

    def sft_config(self) -> SFTConfig:
        flags = {name: getattr(self, name) for name in self.model_fields_set - _LAUNCH_FIELDS}
        if self.config:
            return SFTConfig.from_yaml(self.config, **flags)
        return SFTConfig(**flags)


def accept_bare_bool_flags(argv: list[str]) -> list[str]:
    """The seed mixes `--packing True` with bare `--do_last_save`; give bare ones `true`."""
    bools = {f"--{name}" for name, field in SFTCommand.model_fields.items() if field.annotation is bool}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in bools and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def run_sft(argv: list[str]) -> int:
    from raysft.orchestrator.trainer import SFTTrainer, TrainingFailed

    try:
        command = CliApp.run(SFTCommand, cli_args=accept_bare_bool_flags(argv))
        output = SFTTrainer(
            arguments=command.sft_config(),
            model=command.repo_id,
            train_dataset=command.dataset_name,
            eval_dataset=command.eval_dataset_name,
        ).train()
    except ValidationError as err:
        print(f"raysft sft: invalid configuration\n{err}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad model or data: already one line naming what is wrong
        print(f"raysft sft: {err}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        print(f"raysft sft: training failed: {err}", file=sys.stderr)
        return 1
    print(f"exported: {output.export_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("sft",):
        print("usage: raysft sft [--help] [--config FILE.yaml] --repo_id MODEL --dataset_name DATA [flags]", file=sys.stderr)
        return 2
    return run_sft(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
