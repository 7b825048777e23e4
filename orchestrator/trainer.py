"""`SFTTrainer`: prepare data on Ray Data, train on a Ray Train JAX worker group, export."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings
from raysft.orchestrator.cluster import connect
from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.progress import ProgressReporter
from raysft.orchestrator.report import write_report
from raysft.orchestrator.restarts import RestartBudget, classify
from raysft.orchestrator.tracking import WandbTracker
from raysft.workers.models.auto import CausalLM, resolve_model_dir
from raysft.workers.spec import TrainSpec
from raysft.workers.train_loop import train_loop_per_worker


class TrainingFailed(RuntimeError):
    """The worker group failed; the message carries the workers' own error."""


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """What a finished `train()` produced; `summary` is also in `run_dir/summary.json`."""

    run_dir: Path
    export_dir: Path
    checkpoint_dir: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


class SFTTrainer:
    def __init__(
        self,
        arguments: SFTConfig,
        model: str | Path | CausalLM,
        train_dataset: Any,
        eval_dataset: Any = None,
        processing_class: Any = None,
        formatting_func: Any = None,
        quiet: bool = False,
    ):
        """`model`: a Hugging Face directory, a `.gguf` file, a hub id, or a loaded `CausalLM`
        (whose weights the workers reload from its directory, each host only its shards).
        `processing_class`: the tokenizer (default: the model directory's).
        `formatting_func(row) -> str`: the text to train on, for rows of any shape."""
        if isinstance(model, CausalLM):
            # `from_pretrained(..., dtype=jnp.bfloat16)` means training in bf16, as in the
            # seed's examples, unless the config says otherwise.
            loaded = {name: np.dtype(getattr(model, name)).name for name in ("dtype", "param_dtype")}
            arguments = arguments.model_copy(
                update={k: v for k, v in loaded.items() if k not in arguments.model_fields_set}
            )
        self.args = arguments
        self.model_dir = model.model_dir if isinstance(model, CausalLM) else resolve_model_dir(model)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = processing_class
        self.formatting_func = formatting_func
        self.quiet = quiet

    def _save_tokenizer(self, out_dir: Path) -> Path:
        tokenizer = self.tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        tokenizer.save_pretrained(out_dir)
        return out_dir

    def prepare_data(self):
        """Tokenize and pack the datasets on Ray Data (or reuse the prepared stores):
        (tokenizer_dir, train store, eval store or None)."""
        args = self.args
        run_dir = args.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = self._save_tokenizer(run_dir / "tokenizer")
        connect(args.hosts)

        def prepare(dataset, packing: bool):
            settings = DataSettings(
                seq_len=args.max_sequence_length,
                text_field=args.dataset_text_field,
                dataset_format=args.dataset_format,
                packing=packing,
                packing_strategy=args.packing_strategy,
                add_special_tokens=args.add_special_tokens,
                completion_only_loss=args.completion_only_loss,
                assistant_only_loss=args.assistant_only_loss,
                train_on_inputs=args.train_on_inputs,
                truncation=args.truncation,
                on_bad_rows=args.on_bad_rows,
            )
            return prepare_dataset(
                dataset,
                tokenizer_dir,
                settings,
                run_dir / "data",
                batch_size=args.dataset_batch_size,
                num_proc=args.dataset_num_proc,
                formatting_func=self.formatting_func,
                hub_options=dict(split=args.dataset_split, data_dir=args.data_dir, kwargs=args.dataset_kwargs),
                report=None if self.quiet else print,
            )

        train_store = prepare(self.train_dataset, args.packing)
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        eval_store = prepare(self.eval_dataset, eval_packing) if self.eval_dataset is not None else None
        return tokenizer_dir, train_store, eval_store

    def train(self) -> TrainOutput:
        args = self.args
        run_dir = args.run_dir
        tokenizer_dir, train_store, eval_store = self.prepare_data()

        summary_file = run_dir / "summary.json"
        summary_file.unlink(missing_ok=True)
        tracker = None
        if args.use_wandb:
            tracker = WandbTracker(run_dir, args.model_name, args.wandb_project, args.wandb_entity, args.model_dump(mode="json"))
        try:
            with ProgressReporter(quiet=self.quiet, sinks=[tracker] if tracker else []) as progress:
                spec = TrainSpec.from_config(
                    args,
                    model_dir=str(self.model_dir),
                    tokenizer_dir=str(tokenizer_dir),
                    train_store=str(train_store.path),
                    eval_store=str(eval_store.path) if eval_store else None,
                    checkpoint_dir=str(run_dir / "checkpoints"),
                    export_dir=str(run_dir / "export"),
                    summary_file=str(summary_file),
                    metrics_queue=progress.queue,
                )
                self._fit(spec, run_dir, progress)
            if not summary_file.is_file():
                raise TrainingFailed(f"training ended without writing {summary_file}")
            summary = json.loads(summary_file.read_text())
            write_report(run_dir / "report", progress.records, {"model_name": args.model_name, **summary})
        except BaseException:
            if tracker:
                tracker.fail()
            raise
        if tracker:
            tracker.finish(summary)
        return TrainOutput(run_dir, Path(spec.export_dir), Path(spec.checkpoint_dir), summary, progress.records)

    def _fit(self, spec: TrainSpec, run_dir: Path, progress: ProgressReporter) -> None:
        """Run attempts until one finishes; each failed one restarts from the latest
        checkpoint while its kind's budget lasts (see `restarts`)."""
        from ray.train import TrainingFailedError

        budget = RestartBudget(self.args.max_restarts, self.args.max_preemption_restarts)
        while True:
            try:
                self._attempt(spec, run_dir).fit()
                return
            except TrainingFailedError as err:
                failure = classify(err)
                if not budget.allow(failure):
                    spent = "" if failure.kind == "input" else f"; {budget.describe(failure)}"
                    raise TrainingFailed(failure.message + spent) from err
                progress.note(
                    {"event": "restart", "time": time.time(), "kind": failure.kind, "cause": failure.message,
                     "message": f"{budget.describe(failure)} after {failure.message}; resuming from the latest checkpoint"}
                )

    def _attempt(self, spec: TrainSpec, run_dir: Path):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.v2.jax import JaxTrainer

        args = self.args
        tpu = args.tpu_slice
        if tpu is not None:
            scaling = ScalingConfig(
                num_workers=tpu.num_workers,
                use_tpu=True,
                topology=tpu.topology,
                accelerator_type=tpu.accelerator_type,
                resources_per_worker={**tpu.resources_per_worker, **(args.worker_resources or {})},
            )
        else:
            gpu = args.backend == "gpu"
            default = {"GPU": 1} if gpu else {"CPU": 1}
            scaling = ScalingConfig(
                num_workers=args.num_hosts, use_gpu=gpu, resources_per_worker=args.worker_resources or default
            )
        env = {"JAX_PLATFORMS": "cpu"} if args.backend == "cpu" else {}
        return JaxTrainer(
            train_loop_per_worker,
            train_loop_config=spec.as_dict(),
            scaling_config=scaling,
            run_config=RunConfig(
                name="train",
                storage_path=str(run_dir / "ray"),
                # Ray restarts nothing itself: `_fit` decides, by the kind of failure.
                failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
                worker_runtime_env={"env_vars": env},
            ),
        )
