"""A model on one host's devices, answering prompts for `raysft generate` and `raysft chat`
(a Ray actor: on this machine's embedded Ray or on a node of the cluster)."""

from __future__ import annotations

from raysft.storage.credentials import NONE, Credentials
from raysft.workers.spec import TrainSpec


class GenerationServer:
    def __init__(self, spec_fields: dict, step: int | None, credentials: Credentials = NONE):
        """`spec_fields`: the model, its tokenizer and how it computes (a run's settings for
        a run directory); `step`: the checkpoint of `spec.checkpoint_dir` to load, or None
        for the model's own weights; `credentials`: the driver's, for a model or checkpoint
        in object storage or on the hub. The mesh is this host's devices."""
        credentials.apply()
        from raysft.workers.checkpoints.checkpoint import Checkpoints
        from raysft.workers.generation.text_generation import TextGenerator
        from raysft.workers.sharded_model import ShardedModel

        spec = TrainSpec(**spec_fields)
        model = ShardedModel.build(spec)
        if step is None:
            self.params, _ = model.initial_params(spec)
        else:
            checkpoints = Checkpoints(spec.checkpoint_dir, keep=None)
            self.params = model.checkpoint_params(checkpoints, step, spec)
            checkpoints.close()
        self.generator = TextGenerator.for_model(model, spec)
        self.params = self.generator.placement.place(self.params)

    def generate(self, prompts: list, sampling: dict, stop_strings: list[str], truncate: bool = False) -> dict:
        """{"answers": one per prompt, "warnings": what to tell the user}."""
        from raysft.workers.generation.sampler import SamplingParams

        answers, warnings = self.generator.generate_with_warnings(
            self.params, prompts, SamplingParams(**sampling), stop_strings, truncate
        )
        return {"answers": answers, "warnings": warnings}

    def has_chat_template(self) -> bool:
        return bool(getattr(self.generator.tokenizer, "chat_template", None))
