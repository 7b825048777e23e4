"""Live training progress on the driver, fed by rank 0 through a Ray queue."""

from __future__ import annotations

import queue
import threading

import ray
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm

# Answers printed per eval; all of them are in report/generations.md.
SHOWN_ANSWERS = 3


class ProgressReporter:
    """Drains worker metrics in a background thread into a progress bar and log lines."""

    def __init__(self, quiet: bool = False, sinks=()):
        """`quiet`: for logs (`ray job logs`): no bar and no line per step; starts, evals,
        epochs, warnings and restarts are still printed.
        `sinks`: objects with `log(record)` that see every record too (wandb)."""
        # On the driver's node: a queue on a worker node would die with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.records: list[dict] = []
        self.quiet = quiet
        self.sinks = list(sinks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._bar: tqdm | None = None

    def __enter__(self) -> "ProgressReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._bar is not None:
            self._bar.close()
        self.queue.shutdown()

    def note(self, record: dict) -> None:
        """A driver-side event (a restart), kept and shown with the workers' ones."""
        self._take(record)

    def _take(self, record: dict) -> None:
        self.records.append(record)
        for sink in self.sinks:
            sink.log(record)
        self._show(record)

    def _drain(self) -> None:
        while True:
            try:
                record = self.queue.get(timeout=0.5)
            except (Empty, queue.Empty):
                if self._stop.is_set():
                    return
                continue
            self._take(record)

    def _show(self, record: dict) -> None:
        event = record["event"]
        if event == "start":
            if self._bar is not None:  # a restarted attempt
                self._bar.close()
            if not self.quiet:
                # A bar on a terminal only: piped into a log, its redraws are noise.
                self._bar = tqdm(total=record["total_steps"], initial=record["start_step"], desc="train", unit="step",
                                 disable=None)
            resumed = f"resumed at step {record['start_step']}" if record["start_step"] else "from step 0"
            eval_part = f", eval loss {record['eval_loss']:.4f}" if record["eval_loss"] is not None else ""
            if record.get("exact_match") is not None:
                eval_part += f", exact match {record['exact_match']:.3f}"
            tqdm.write(f"training {resumed} of {record['total_steps']}{eval_part}{_trained_share(record)}")
        elif event == "step" and self._bar is not None:
            tqdm.write(
                f"step {record['step']:>5}  loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  acc {record['token_accuracy']:.3f}  "
                f"tokens/s {record['tokens_per_second']:.0f}  step {record['step_time_s']:.2f}s  "
                f"pad {record['padding_fraction']:.1%}  mfu {record['mfu']:.1%}" + _routing(record) + _rewards(record)
            )
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
        elif event == "eval":
            per_source = "".join(
                f"  {key.split('/', 1)[1]} {value:.4f}" for key, value in record.items() if key.startswith("eval_loss/")
            )
            parts = []
            if "perplexity" in record:
                parts.append(f"loss {record['loss']:.4f}  perplexity {record['perplexity']:.2f}  "
                             f"token accuracy {record['token_accuracy']:.3f}")
            elif "loss" in record:
                parts.append(f"loss {record['loss']:.4f}{_rewards(record)}")
            if "exact_match" in record:
                parts.append(f"exact match {record['exact_match']:.3f}")
            tqdm.write(f"eval at step {record['step']}: " + "  ".join(parts) + (f"  | loss by source:{per_source}" if per_source else ""))
        elif event == "generations":
            tqdm.write(show_generations(record, SHOWN_ANSWERS))
        elif event == "first_step":
            tqdm.write(f"step {record['step']} (compilation included) took {record['seconds']:.1f} s")
        elif event == "epoch":
            tqdm.write(f"epoch {record['epoch']} done at step {record['step']}: loss {record['loss']:.4f}")
        elif event in ("warning", "restart", "note"):
            tqdm.write(f"{event}: {record['message']}")
        elif event == "preempted":
            tqdm.write(f"preemption notice: saved step {record['step']}; restarting")
        elif event == "unfreeze":
            tqdm.write(f"unfreezing at step {record['step']}:{_trained_share(record)[1:]}")


def _trained_share(record: dict) -> str:
    """`, training 1,234 of 5,678 parameters (21.7%)`, or "" where not reported."""
    trained, total = record.get("trainable_parameters"), record.get("total_parameters")
    if not total:
        return ""
    return f", training {trained:,} of {total:,} parameters ({trained / total:.1%})"


def show_generations(record: dict, shown: int) -> str:
    samples = record["samples"]
    judged = f"; exact match {record['exact_match']:.3f} over {len(samples)}" if "exact_match" in record else ""
    took = f"; {record['seconds']:.1f} s" if "seconds" in record else ""
    lines = [f"answers at step {record['step']} ({min(shown, len(samples))} of {len(samples)}{judged}{took}):"]
    for sample in samples[:shown]:
        lines.append(f"  Q: {_one_line(sample['prompt'])}")
        lines.append(f"  A: {_one_line(sample['answer'])}")
        if "reference" in sample:
            lines.append(f"     reference: {_one_line(sample['reference'])}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rewards(record: dict) -> str:
    """A preference run's reward accuracy and margin (TRL's `rewards/*`)."""
    if "rewards/accuracies" not in record:
        return ""
    return (f"  reward acc {record['rewards/accuracies']:.3f}  margin {record['rewards/margins']:.4f}  "
            f"chosen {record['rewards/chosen']:.4f}  rejected {record['rewards/rejected']:.4f}")


def _routing(record: dict) -> str:
    """A mixture-of-experts model's load-balancing loss and its least and most loaded
    expert's share of a layer's assignments (1 / experts each when balanced)."""
    if "aux_loss" not in record:
        return ""
    return (f"  aux {record['aux_loss']:.4f}  expert load {record['expert_load_min']:.1%}"
            f"-{record['expert_load_max']:.1%}")
