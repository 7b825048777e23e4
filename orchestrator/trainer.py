"""`SFTTrainer`: prepare data on Ray Data, train on a Ray Train JAX worker group, export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from etils import epath

from raysft.data import mixture
from raysft.data.data_nodes import off_tpu_hosts
from raysft.data.eval_prompts import eval_prompts
from raysft.data.prepare import prepare_dataset
from raysft.orchestrator.cluster import connect
from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.node_checks import check_every_node
from raysft.orchestrator.progress import ProgressReporter
from raysft.orchestrator.ray_logs import ray_logs_to
from raysft.orchestrator.redact import redact
from raysft.orchestrator.report import write_report
from raysft.orchestrator.restarts import RestartBudget, classify
from raysft.orchestrator.run_record import RunRecord
from raysft.orchestrator.tracking import WandbTracker
from raysft.orchestrator.worker_group import worker_group
from raysft.storage.locations import is_object_storage, location, make_dir, staging_dir, upload
from raysft.storage.shared_storage import write_marker
from raysft.workers.generation.text_generation import as_prompt
from raysft.workers.models.auto import CausalLM
from raysft.workers.models.source import ModelSource
from raysft.workers.spec import TrainSpec
from raysft.workers.training.train_loop import train_loop_per_worker


class TrainingFailed(RuntimeError):
    """The worker group failed; the message carries the workers' own error."""


@dataclasses.dataclass(frozen=True)
class TrainOutput:
    """What a finished `train()` produced; `summary` is also in `run_dir/summary.json`."""

    run_dir: epath.Path  # local, or an object-storage prefix
    export_dir: epath.Path  # the Hugging Face model (with LoRA: the adapters merged in)
    checkpoint_dir: epath.Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    adapter_dir: epath.Path | None = None  # with LoRA: the PEFT adapter directory


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
        verbose: bool = False,
    ):
        """`model`: a Hugging Face directory (on storage every host sees), a `.gguf` file, a
        hub id, an `s3://`/`gs://` URI, or a `CausalLM` from `from_pretrained`. The driver
        reads only the config and tokenizer; each host fetches the weights into its own
        cache and reads only its shards.
        `processing_class`: the tokenizer (default: the model directory's).
        `formatting_func(row) -> str`: the text to train on, for rows of any shape.
        `quiet`: for logs: no progress bar or per-step lines (evals, epochs, restarts stay).
        `verbose`: Ray's own output (its workers', Ray Data's, Gloo's) on the console too;
        by default it goes to `run_dir/logs/ray.log`."""
        if isinstance(model, CausalLM):
            # `from_pretrained(..., dtype=jnp.bfloat16)` means training in bf16, as in the
            # seed's examples, unless the config says otherwise.
            loaded = {name: np.dtype(getattr(model, name)).name for name in ("dtype", "param_dtype")}
            arguments = arguments.model_copy(
                update={k: v for k, v in loaded.items() if k not in arguments.model_fields_set}
            )
        self.args = arguments
        self.model = (model.source if isinstance(model, CausalLM) else ModelSource.parse(model)).pinned()
        self.model_dir = self.model.fetch(weights=False)
        if arguments.use_lora or arguments.frozen_parameters or arguments.trainable_parameters or arguments.unfreeze_schedule:
            from raysft.orchestrator.plan import plan_spec
            from raysft.workers.training.trainable import check_run

            check_run(plan_spec(arguments, self.model_dir), self.model_dir)  # before Ray starts too
        mixture.parts(train_dataset)  # a bad mixture fails here, before Ray starts
        if eval_dataset is not None:
            mixture.parts(eval_dataset, "eval_dataset")
        elif arguments.generate_during_eval and not arguments.generation_prompts:
            raise ValueError("generate_during_eval answers eval rows: pass an eval_dataset, or set generation_prompts")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = processing_class
        self.formatting_func = formatting_func
        self.quiet = quiet
        self.verbose = verbose

    @contextlib.contextmanager
    def _ray_logs(self) -> Iterator[None]:
        """Ray's own output to run_dir/logs/ray.log (sent there at the end on object storage)."""
        run_dir = self.args.run_dir
        with ray_logs_to(staging_dir(run_dir / "logs"), self.verbose) as log_file:
            try:
                yield
            finally:
                if log_file and is_object_storage(run_dir):
                    upload(log_file.parent, run_dir / "logs")

    def _load_tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self.tokenizer

    def _save_tokenizer(self, target: epath.Path) -> epath.Path:
        local = staging_dir(target)
        self._load_tokenizer().save_pretrained(local)
        if is_object_storage(target):
            upload(local, target)
        return target

    def refuse_other_data(self, fingerprint: str) -> None:
        """A run directory whose latest checkpoint was trained on other data stops here,
        before any worker starts (each worker checks again as it restores)."""
        directory = self.args.run_dir / "checkpoints"
        if self.args.allow_data_change or not directory.is_dir():
            return
        from raysft.workers.checkpoints.checkpoint import Checkpoints  # orbax, for runs that resume

        checkpoints = Checkpoints(str(directory), keep=None)
        try:
            step = checkpoints.latest_step()
            if step is not None:
                checkpoints.refuse_other_data(step, fingerprint, allow_data_change=False)
        finally:
            checkpoints.close()

    def prepare_data(self):
        """Tokenize and pack the datasets on Ray Data (or reuse the prepared stores):
        (tokenizer_dir, train store, eval stores by name: "" for one unnamed eval_dataset).

        `train_dataset` may be a mixture (`data.mixture`), mixed by the config's seed and
        `mixture_stopping`; an `eval_dataset` dict is evaluated source by source."""
        args = self.args
        make_dir(args.run_dir)
        with self._ray_logs():
            return self._prepare_data()

    def _prepare_data(self):
        args = self.args
        run_dir = args.run_dir
        tokenizer_dir = self._save_tokenizer(run_dir / "tokenizer")
        connect(args.hosts)
        tpu = args.tpu_slice
        data_nodes = None if args.data_on_tpu_hosts else off_tpu_hosts([tpu.tpu_type] if tpu else [])

        def prepare(dataset, packing: bool):
            return prepare_dataset(
                dataset,
                tokenizer_dir,
                args.data_settings(packing),
                run_dir / "data",
                batch_size=args.dataset_batch_size,
                num_proc=args.dataset_num_proc,
                formatting_func=self.formatting_func,
                hub_options=dict(split=args.dataset_split, data_dir=args.data_dir, kwargs=args.dataset_kwargs),
                report=print,
                timeout_s=args.data_timeout_s,
                label_selector=data_nodes,
                mixture_seed=args.seed,
                mixture_stopping=args.mixture_stopping,
            )

        train_store = prepare(self.train_dataset, args.packing)
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        eval_parts = mixture.parts(self.eval_dataset, "eval_dataset") if self.eval_dataset is not None else []
        eval_stores = {part.name: prepare(part.source, eval_packing) for part in eval_parts}
        trained_sources = train_store.meta.get("sources", {})
        eval_only = [name for name in eval_stores if trained_sources and name not in trained_sources]
        if eval_only:
            print(f"eval sources not in the training mixture, evaluated only: {', '.join(eval_only)}")
        self._check_vocabulary([train_store, *eval_stores.values()])
        return tokenizer_dir, train_store, eval_stores

    def eval_prompts(self) -> list[dict] | None:
        """What the model answers at every eval: `generation_prompts`, or the first
        `generate_during_eval` rows of the eval set without their last answer."""
        args = self.args
        if args.generation_prompts:
            return [as_prompt(prompt, self._load_tokenizer()) for prompt in args.generation_prompts]
        if not args.generate_during_eval:
            return None
        return eval_prompts(
            self.eval_dataset, args.generate_during_eval, args.dataset_text_field or "text", args.dataset_format,
            dict(split=args.dataset_split, data_dir=args.data_dir, kwargs=args.dataset_kwargs),
        )

    def _check_vocabulary(self, stores) -> None:
        """A token id past the embedding table would train on NaN (JAX fills out-of-range
        gathers); say so before any worker starts."""
        from raysft.workers.models.config import ModelConfig

        vocab_size = ModelConfig.from_file(self.model_dir / "config.json").vocab_size
        for store in stores:
            max_id = store.meta.get("max_token_id", -1)
            if max_id >= vocab_size:
                raise ValueError(
                    f"{store.meta['source']}: token id {max_id} is past the model's vocabulary ({vocab_size} tokens "
                    f"in {self.model_dir / 'config.json'}); the tokenizer ({len(self._load_tokenizer())} tokens) has "
                    "tokens the model has no embeddings for: use the model's own tokenizer or resize its embeddings"
                )

    def check_fits(self) -> None:
        """On TPU: compile the train step for the slice here on the driver (seconds to a
        minute on a CPU head) and stop if it cannot fit, before a slice is requested."""
        from raysft.orchestrator.plan import DoesNotFit, plan
        from raysft.orchestrator.tpu import CompilerUnavailable
        from raysft.workers.runtime.chips import UnknownChip

        args = self.args
        try:
            result = plan(args, self.model_dir, evaluate=False, export=False, estimate=False, search=False)
        except (CompilerUnavailable, UnknownChip) as err:
            print(f"raysft: warning: not checking that the run fits {args.tpu_slice.tpu_type} ({err})")
            return
        if not result.fits:
            raise DoesNotFit(f"{args.tpu_slice.tpu_type}: {result.verdict()}; plan_before_training=False trains anyway")
        print(f"plan: the train step {result.verdict()} ({result.compiled.train.compile_s:.0f} s to compile here)")

    def train(self) -> TrainOutput:
        if self.args.backend == "tpu" and self.args.plan_before_training:
            self.check_fits()
        marker = write_marker(self.args.run_dir)  # first: an unwritable save_directory is one line, before Ray starts
        with self._ray_logs():
            return self._train(marker)

    def _train(self, marker: tuple[str, str]) -> TrainOutput:
        args = self.args
        run_dir = args.run_dir
        connect(args.hosts)
        check_every_node(marker, str(self.model))
        tokenizer_dir, train_store, eval_stores = self.prepare_data()
        self.refuse_other_data(train_store.fingerprint)
        prompts = self.eval_prompts()
        RunRecord(self.model, args).write(run_dir)

        summary_file = run_dir / "summary.json"
        summary_file.unlink(missing_ok=True)
        tracker = None
        if args.use_wandb:
            tracker = WandbTracker(
                staging_dir(run_dir), args.model_name, args.wandb_project, args.wandb_entity,
                redact(args.model_dump(mode="json")),
            )
        try:
            with ProgressReporter(quiet=self.quiet, sinks=[tracker] if tracker else []) as progress:
                spec = TrainSpec.from_config(
                    args,
                    model=str(self.model),
                    tokenizer_dir=str(tokenizer_dir),
                    train_store=str(train_store.path),
                    eval_stores={name: str(store.path) for name, store in eval_stores.items()},
                    checkpoint_dir=str(run_dir / "checkpoints"),
                    export_dir=str(run_dir / "export"),
                    adapter_dir=str(run_dir / "adapter") if args.use_lora else None,
                    summary_file=str(summary_file),
                    metrics_queue=progress.queue,
                    storage_marker=marker,
                    eval_prompts=prompts,
                )
                self._fit(spec, run_dir, progress)
            if not summary_file.is_file():
                raise TrainingFailed(f"training ended without writing {summary_file}")
            summary = json.loads(summary_file.read_text())
            report = staging_dir(run_dir / "report")
            write_report(report, progress.records, {"model_name": args.model_name, **summary})
            if is_object_storage(run_dir):
                upload(report, run_dir / "report")
        except BaseException:
            if tracker:
                tracker.fail()
            raise
        if tracker:
            tracker.finish(summary)
        return TrainOutput(
            run_dir, location(spec.export_dir), location(spec.checkpoint_dir), summary, progress.records,
            location(spec.adapter_dir) if spec.adapter_dir else None,
        )

    def _fit(self, spec: TrainSpec, run_dir: epath.Path, progress: ProgressReporter) -> None:
        """Run attempts until one finishes; each failed one restarts from the latest
        checkpoint while its kind's budget lasts (see `restarts`)."""
        from ray.train import TrainingFailedError

        budget = RestartBudget(self.args.max_restarts, self.args.max_preemption_restarts)
        while True:
            try:
                worker_group(self.args, train_loop_per_worker, spec.as_dict(), run_dir, "train").fit()
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
