"""Answers to the eval prompts at every eval, on the training mesh, with the exact match
of each answer against the row's reference answer."""

from __future__ import annotations

import dataclasses
import time

import jax

from raysft.workers.generation.sampler import SamplingParams
from raysft.workers.generation.text_generation import TextGenerator, exact_match
from raysft.workers.sharded_model import ShardedModel
from raysft.workers.spec import TrainSpec


@dataclasses.dataclass
class EvalGenerations:
    generator: TextGenerator
    prompts: list[dict]
    sampling: SamplingParams

    @classmethod
    def build(cls, spec: TrainSpec, model: ShardedModel) -> "EvalGenerations | None":
        if not spec.eval_prompts:
            return None
        generator = TextGenerator.for_model(model, spec)
        sampling = SamplingParams(
            spec.generation_max_new_tokens, spec.generation_temperature, spec.generation_top_k,
            spec.generation_top_p, spec.seed,
        )
        return cls(generator, spec.eval_prompts, sampling)

    def run(self, params: dict[str, jax.Array], step: int) -> dict:
        """The `generations` record of this step: a sample per prompt and, where the
        prompts have references, `exact_match` (the fraction answered exactly)."""
        started = time.perf_counter()
        answers = self.generator.generate(self.generator.placement.place(params), self.prompts, self.sampling)
        samples = []
        for prompt, answer in zip(self.prompts, answers):
            sample = {"source": prompt.get("source", ""), "prompt": shown_prompt(prompt), "answer": answer}
            if prompt.get("reference") is not None:
                sample.update(reference=prompt["reference"], exact_match=exact_match(answer, prompt["reference"]))
            samples.append(sample)
        record = {"event": "generations", "step": step, "samples": samples, "seconds": time.perf_counter() - started}
        judged = [s["exact_match"] for s in samples if "exact_match" in s]
        if judged:
            record["exact_match"] = sum(judged) / len(judged)
        return record


def shown_prompt(prompt: dict) -> str:
    """What a person reads as the question: the last user message, or the raw text."""
    if "messages" in prompt:
        users = [m["content"] for m in prompt["messages"] if m["role"] == "user"]
        return users[-1] if users else prompt["messages"][-1]["content"]
    return prompt["text"]
