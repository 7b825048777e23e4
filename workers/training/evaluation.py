"""Eval: the objective's eval metrics (SFT: loss, perplexity and token accuracy; preference:
loss, rewards and log-probabilities) over every eval row of every eval source, and the eval
prompts' answers."""

from __future__ import annotations

import jax

from raysft.workers.generation.eval_generation import EvalGenerations
from raysft.workers.training.programs import RunPrograms
from raysft.workers.training.run_context import RunContext


class Evaluator:
    def __init__(self, run: RunContext, programs: RunPrograms):
        self.run = run
        # The first stage's eval program serves every stage: it takes every parameter,
        # trained and frozen, so a stage's own would only compile it again.
        self.eval_step, self.batch_sharding = programs.eval_step, programs.batch_sharding
        self.objective = programs.objective
        self.generations = EvalGenerations.build(run.spec, run.model)

    def __bool__(self) -> bool:
        return bool(self.run.eval_stores) or self.generations is not None

    def __call__(self, params: dict, step: int) -> dict | None:
        """`params`: every parameter. The objective's eval metrics over all eval sources
        (one host sync), and per named source `eval_loss/<name>` and
        `eval_token_accuracy/<name>`; with eval prompts, their answers (published) and
        `exact_match`. None where there is nothing to report."""
        generated = {}
        if self.generations is not None:
            record = self.generations.run(params, step)
            self.run.publish(record)
            generated = {k: v for k, v in record.items() if k == "exact_match"}
        if not self.run.eval_stores:
            return generated or None
        on_device = {}
        for name, store in self.run.eval_stores.items():
            sums = [self.eval_step(params, self.run.batch(store, rows, self.batch_sharding))
                    for rows in store.eval_batches(self.run.spec.total_batch_size)]
            on_device[name] = {key: sum(s[key] for s in sums) for key in self.objective.eval_keys}
        # A list, not the dict: pytrees sort dict keys, and the sources keep the user's order.
        per_source = dict(zip(on_device, jax.device_get(list(on_device.values()))))
        overall = {key: sum(float(totals[key]) for totals in per_source.values()) for key in self.objective.eval_keys}
        result = self.objective.eval_metrics(overall)
        for name, totals in per_source.items():
            if name:
                metrics = self.objective.eval_metrics(totals)
                result[f"eval_loss/{name}"] = metrics["loss"]
                result[f"eval_token_accuracy/{name}"] = metrics["token_accuracy"]
        return {**result, **generated}

