"""`raysft sft` (also `python -m raysft.orchestrator.sft`): the seed's command line, via
pydantic-settings; `raysft dpo`: preference tuning with DPOConfig's flags; `raysft preprocess`: prepare the data and show the loss masks;
`raysft plan`: will the run fit its TPU slice (compiled for it, no TPU needed);
`raysft export`: write any checkpoint of a run in the Hugging Face layout;
`raysft generate` / `raysft chat`: answers from a model or a run's checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from raysft.orchestrator.config import SFTConfig, read_yaml
from raysft.orchestrator.config_groups import DType
from raysft.orchestrator.dpo_config import DPOConfig

# What to run on, and how to show it: flags, or keys of the --config file; not SFTConfig fields.
_LAUNCH_FIELDS = ("repo_id", "dataset_name", "eval_dataset_name", "quiet", "verbose", "show", "estimate", "search",
                  "objective")


class SFTCommand(BaseSettings, SFTConfig):
    """Fine-tune a model: every SFTConfig field is a flag; --config loads a YAML first."""

    model_config = SettingsConfigDict(
        cli_prog_name="raysft sft", cli_implicit_flags=False, extra="forbid", frozen=True
    )

    config: str | None = Field(
        None, description="YAML file of SFTConfig fields (and repo_id, dataset_name, ...); flags override it."
    )
    repo_id: str | None = Field(
        None, description="Model: a Hugging Face directory, a .gguf file or a hub repo id (required, here or in --config)."
    )
    dataset_name: str | dict[str, Any] | None = Field(
        None, description="Training data: a .jsonl/.json/.parquet/.csv file or a hub dataset (required, here or in --config); "
        'a mixture as JSON: {"name": {"path": ..., "weight": 0.3}, ...}.'
    )
    eval_dataset_name: str | dict[str, Any] | None = Field(
        None, description='Held-out data, evaluated before and after; {"name": path, ...} evaluates each source.'
    )
    quiet: bool = Field(False, description="For logs: no progress bar or per-step lines; evals, epochs, restarts still shown.")
    verbose: bool = Field(False, description="Ray's own output (Ray Data, Ray Train, Gloo, its workers) on the console too; "
                          "else it goes to <save_directory>/<model_name>/logs/ray.log.")

    required: ClassVar[tuple[str, ...]] = ("repo_id", "dataset_name")
    config_class: ClassVar[type[SFTConfig]] = SFTConfig

    def resolve(self) -> tuple[SFTConfig, dict]:
        """(the run's SFTConfig, the launch values): the --config file, then the flags over it."""
        values = read_yaml(self.config) if self.config else {}
        values.update({name: getattr(self, name) for name in self.model_fields_set - {"config"}})
        launch = {name: values.pop(name, getattr(self, name)) for name in _LAUNCH_FIELDS if name in type(self).model_fields}
        for name in self.required:
            if not launch[name]:
                raise ValueError(f"--{name} is required (a flag, or a key of the --config file)")
        return self.config_class(**values), launch


class DPOCommand(SFTCommand, DPOConfig):
    """Preference-tune a model (DPO, IPO, hinge, SimPO, ORPO): every DPOConfig field is a
    flag; --config loads a YAML first; --dataset_name holds prompt/chosen/rejected rows."""

    model_config = SettingsConfigDict(cli_prog_name="raysft dpo")
    config_class: ClassVar[type[SFTConfig]] = DPOConfig


class PreprocessCommand(SFTCommand):
    """Prepare the data as `raysft sft` would, print the stats and N examples with their
    trained tokens inside [[ ]], and stop before training."""

    model_config = SettingsConfigDict(cli_prog_name="raysft preprocess")

    show: int = Field(3, ge=0, description="Prepared examples to print, drawn at random (seeded by --seed), with the trained tokens marked.")


class PlanCommand(SFTCommand):
    """Compile the run's train step (and eval step, with --eval_dataset_name) and export
    for its TPU slice (--tpu_type, or --accelerator_type with --topology; --num_slices)
    on this machine, without a TPU and without weights (the model's config.json is
    enough): memory per chip against the chip's HBM, an estimated step time, and when
    it does not fit the smallest change that does. Exit 1 when it does not fit."""

    model_config = SettingsConfigDict(cli_prog_name="raysft plan")
    required: ClassVar[tuple[str, ...]] = ("repo_id",)

    estimate: bool = Field(True, description="Also estimate the step time from the compiler's cost model (2 more compiles).")
    search: bool = Field(True, description="When it does not fit, compile candidate changes to find the smallest that fits.")
    objective: Literal["sft", "dpo"] = Field("sft", description="dpo: plan a `raysft dpo` run (DPOConfig's flags), "
                                             "its step on paired rows.")


class DPOPlanCommand(PlanCommand, DPOConfig):
    model_config = SettingsConfigDict(cli_prog_name="raysft plan --objective dpo")
    config_class: ClassVar[type[SFTConfig]] = DPOConfig


class ExportCommand(BaseSettings):
    """Export a checkpoint of a run directory (safetensors, config, tokenizer) on the run's
    own hosts and mesh; the run's settings come from its run.json."""

    model_config = SettingsConfigDict(cli_prog_name="raysft export", cli_implicit_flags=False, extra="forbid")

    run_dir: str = Field(description="The run directory: save_directory/model_name.")
    step: int | None = Field(None, ge=0, description="Checkpoint step (default: the latest).")
    output_dir: str | None = Field(None, description="Where to write (default: run_dir/export-step-N).")
    export_dtype: DType | None = Field(None, description="Weights' dtype (default: the run's export_dtype).")
    adapter_only: bool = Field(False, description="A LoRA run's adapter as a PEFT adapter directory (default "
                               "run_dir/adapter-step-N) instead of the merged model.")
    verbose: bool = Field(False, description="Ray's own output on the console too; else it goes to the run "
                          "directory's logs/ray.log.")


class ChatCommand(BaseSettings):
    """Chat in the terminal with a model or a run's checkpoint (the chat template of its
    tokenizer; the whole conversation is sent with every turn)."""

    model_config = SettingsConfigDict(cli_prog_name="raysft chat", cli_implicit_flags=False, extra="forbid")

    model: str = Field(description="A model (Hugging Face directory, .gguf file, hub id, s3:// or gs:// URI) or a run "
                       "directory (its latest checkpoint, or --step).")
    step: int | None = Field(None, ge=0, description="Checkpoint step of a run directory (default: the latest).")
    system: str | None = Field(None, description="System prompt.")
    max_new_tokens: int = Field(256, description="Longest answer in tokens.")
    temperature: float = Field(0.0, description="Sampling temperature; 0 is greedy.")
    top_k: int = Field(0, description="Sample from the k most likely tokens (0: all).")
    top_p: float = Field(1.0, description="Sample from the smallest set of tokens holding this probability (1: all).")
    seed: int = Field(0, description="Sampling seed: the same seed, prompts and model give the same answers.")
    stop: list[str] = Field(default_factory=list, description="Stop strings: an answer ends before the first one.")
    dtype: DType | None = Field(None, description="Compute dtype (default: the run's, else float32).")
    resources: dict[str, float] | None = Field(
        None, description="Ray resources of the model's actor (default {'CPU': 1}), e.g. {'TPU': 4} or {'GPU': 1}."
    )
    verbose: bool = Field(False, description="Ray's own output on the console too; else it goes to the run "
                          "directory's logs/ray.log (or $RAYSFT_CACHE/logs/ray.log for a model).")

    def sampling(self):
        from raysft.workers.generation.sampler import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)


class GenerateCommand(ChatCommand):
    """Answer prompts with a model or a run's checkpoint: --prompt prints the answer;
    --prompts_file (JSON lines of {"prompt": ...} or {"messages": [...]}) prints a JSON
    line {"prompt", "answer"} per line. The tokenizer's chat template is applied unless --raw."""

    model_config = SettingsConfigDict(cli_prog_name="raysft generate")

    prompt: str | None = Field(None, description="One prompt (a user message when the tokenizer has a chat template).")
    prompts_file: str | None = Field(None, description="JSON lines, each {\"prompt\": ...} or {\"messages\": [...]}.")
    raw: bool = Field(False, description="Use the prompt text as it is, without the chat template.")
    truncate: bool = Field(False, description="Cut a prompt that leaves the answer less than --max_new_tokens of the "
                           "model's context (with a warning) instead of stopping: a conversation's oldest turns go "
                           "first, never its system prompt; text loses its first tokens after BOS.")


def accept_bare_bool_flags(argv: list[str], command: type[BaseSettings] = SFTCommand) -> list[str]:
    """The seed mixes `--packing True` with bare `--do_last_save`; give bare ones `true`."""
    bools = {f"--{name}" for name, field in command.model_fields.items() if field.annotation is bool}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in bools and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def _ray_logs(model_or_run_dir: str, verbose: bool):
    """Ray's output to a local run directory's logs/, else to the cache's."""
    from raysft.orchestrator.ray_logs import ray_logs_to
    from raysft.orchestrator.run_record import RUN_FILE
    from raysft.storage.locations import default_cache_dir, is_object_storage

    run_dir = Path(model_or_run_dir)
    local_run = not is_object_storage(model_or_run_dir) and (run_dir / RUN_FILE).is_file()
    return ray_logs_to((run_dir if local_run else default_cache_dir()) / "logs", verbose)


def _one_line_errors(prog: str, run) -> int:
    """Bad config: the pydantic report, exit 2; bad model or data: one line, exit 2;
    a failed training or export: one line (and where Ray's own log lines are), exit 1."""
    from raysft.orchestrator.export import ExportFailed
    from raysft.orchestrator.trainer import TrainingFailed

    try:
        return run()
    except ValidationError as err:
        print(f"{prog}: invalid configuration: {validation_line(err)}", file=sys.stderr)
        return 2
    except ValueError as err:  # bad model or data: already one line naming what is wrong
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file named by a flag that is missing or cannot be read
        where = f"{err.filename}: " if err.filename else ""
        print(f"{prog}: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except (TrainingFailed, ExportFailed) as err:
        print(f"{prog}: failed: {err}", *getattr(err, "__notes__", ()), sep="\n", file=sys.stderr)
        return 1


def validation_line(err: ValidationError) -> str:
    """Each of pydantic's errors as `field: message`, on one line."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
    )


def _trainer(config: SFTConfig, launch: dict):
    from raysft.orchestrator.dpo import DPOTrainer
    from raysft.orchestrator.trainer import SFTTrainer

    return (DPOTrainer if isinstance(config, DPOConfig) else SFTTrainer)(
        arguments=config,
        model=launch["repo_id"],
        train_dataset=launch["dataset_name"],
        eval_dataset=launch["eval_dataset_name"],
        quiet=launch["quiet"],
        verbose=launch["verbose"],
    )


def _run_training(command: type[SFTCommand], argv: list[str]) -> int:
    def run() -> int:
        config, launch = CliApp.run(command, cli_args=accept_bare_bool_flags(argv, command)).resolve()
        print(f"exported: {_trainer(config, launch).train().export_dir}")
        return 0

    return _one_line_errors(command.model_config["cli_prog_name"], run)


def run_sft(argv: list[str]) -> int:
    return _run_training(SFTCommand, argv)


def run_dpo(argv: list[str]) -> int:
    return _run_training(DPOCommand, argv)


def _plans_dpo(argv: list[str]) -> bool:
    """`--objective dpo` (or `=dpo`) among the flags: DPOConfig's flags apply."""
    return any(arg == "--objective=dpo" or (arg == "--objective" and nxt == "dpo")
               for arg, nxt in zip(argv, [*argv[1:], ""]))


def run_preprocess(argv: list[str]) -> int:
    def run() -> int:
        from transformers import AutoTokenizer

        from raysft.data.show import show_rows
        from raysft.storage.locations import local_copy

        config, launch = CliApp.run(PreprocessCommand, cli_args=accept_bare_bool_flags(argv)).resolve()
        tokenizer_dir, train_store, _ = _trainer(config, launch).prepare_data()
        if launch["show"]:
            print(f"\n{launch['show']} prepared examples drawn at random (seed {config.seed}); trained tokens are inside [[ ]]:")
            tokenizer = AutoTokenizer.from_pretrained(local_copy(tokenizer_dir))
            print(show_rows(train_store, tokenizer, launch["show"], config.seed))
        print(f"\nprepared rows: {train_store.path}")
        return 0

    return _one_line_errors("raysft preprocess", run)


def run_plan(argv: list[str]) -> int:
    def run() -> int:
        from raysft.orchestrator.plan import plan

        command = DPOPlanCommand if _plans_dpo(argv) else PlanCommand
        config, launch = CliApp.run(command, cli_args=accept_bare_bool_flags(argv, command)).resolve()
        progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        result = plan(
            config, launch["repo_id"], evaluate=bool(launch["eval_dataset_name"]), estimate=False,
            search=launch["search"], progress=progress,
        )
        print(result.report(), flush=True)  # the answer first; the estimate takes two more compiles
        if result.fits:
            if launch["estimate"]:
                progress("estimating the step time (2 more compiles) ...")
                result.add_estimate()
                print(result.estimate_line())
            return 0
        print(f"raysft plan: {result.verdict()}", file=sys.stderr)
        return 1

    return _one_line_errors("raysft plan", run)


def run_export(argv: list[str]) -> int:
    def run() -> int:
        from raysft.orchestrator.export import export_checkpoint

        command = CliApp.run(ExportCommand, cli_args=accept_bare_bool_flags(argv, ExportCommand))
        with _ray_logs(command.run_dir, command.verbose):
            exported = export_checkpoint(
                command.run_dir, command.step, command.output_dir, command.export_dtype, command.adapter_only
            )
        print(f"exported: {exported}")
        return 0

    return _one_line_errors("raysft export", run)


def run_generate(argv: list[str]) -> int:
    def run() -> int:
        import json

        from raysft.orchestrator.generate import RemoteGenerator, read_prompts

        command = CliApp.run(GenerateCommand, cli_args=accept_bare_bool_flags(argv, GenerateCommand))
        sampling = command.sampling()
        prompts = read_prompts(command.prompt, command.prompts_file, command.raw, command.system)
        with _ray_logs(command.model, command.verbose):
            generator = RemoteGenerator(command.model, command.step, command.dtype, command.resources)
            warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
            answers = generator.generate(prompts, sampling, command.stop, command.truncate, warn=warn)
        if command.prompt is not None:
            print(answers[0])
        else:
            for prompt, answer in zip(prompts, answers):
                print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False))
        return 0

    return _one_line_errors("raysft generate", run)


def run_chat(argv: list[str]) -> int:
    def run() -> int:
        from raysft.orchestrator.generate import RemoteGenerator, chat

        command = CliApp.run(ChatCommand, cli_args=accept_bare_bool_flags(argv, ChatCommand))
        sampling = command.sampling()
        with _ray_logs(command.model, command.verbose):
            generator = RemoteGenerator(command.model, command.step, command.dtype, command.resources)
            if not generator.has_chat_template():
                raise ValueError(f"{command.model}: the tokenizer has no chat template to chat with; use raysft generate --raw")
            chat(generator, sampling, command.stop, command.system)
        return 0

    return _one_line_errors("raysft chat", run)


COMMANDS = {
    "sft": run_sft, "dpo": run_dpo, "preprocess": run_preprocess, "plan": run_plan, "export": run_export,
    "generate": run_generate, "chat": run_chat,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: raysft {sft,dpo,preprocess} [--help] [--config FILE.yaml] --repo_id MODEL --dataset_name DATA [flags]\n"
            "       raysft plan [--help] [--objective dpo] [--config FILE.yaml] --repo_id MODEL --tpu_type v5p-16 [flags]\n"
            "       raysft export [--help] --run_dir DIR [--step N] [--output_dir DIR] [--export_dtype bfloat16]\n"
            "       raysft generate [--help] --model MODEL|RUN_DIR [--step N] (--prompt TEXT | --prompts_file F.jsonl) [flags]\n"
            "       raysft chat [--help] --model MODEL|RUN_DIR [--step N] [--system TEXT] [flags]",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
