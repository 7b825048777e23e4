"""Answers from a model or from a run's checkpoint (`raysft generate`, `raysft chat`): the
model is loaded by a Ray actor, on the embedded local Ray or on the cluster in
RAY_ADDRESS, and the prompts go to it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from raysft.orchestrator.cluster import connect
from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.export import complete_step
from raysft.orchestrator.run_record import RUN_FILE, RunRecord
from raysft.orchestrator.worker_group import worker_env
from raysft.storage.credentials import Credentials
from raysft.storage.errors import DataError
from raysft.storage.locations import location
from raysft.workers.generation.sampler import SamplingParams
from raysft.workers.models.config import ModelLoadError, read_hf_config
from raysft.workers.models.source import ModelSource
from raysft.workers.spec import TrainSpec


def server_spec(model: str, step: int | None, dtype: str | None = None) -> tuple[TrainSpec, int | None, str]:
    """(the server's spec, the checkpoint step to load or None, what is loaded in words).

    A run directory (it has run.json) loads checkpoint `step` (default the latest) with
    the run's model, tokenizer and settings; anything else is a model as training takes
    it (a Hugging Face directory, a .gguf file, a hub id, an s3:// or gs:// URI)."""
    target = location(model)
    if (target / RUN_FILE).is_file():
        record = RunRecord.read(target)
        chosen = complete_step(target, step)
        config, source = record.config, record.model
        tokenizer_dir, checkpoint_dir = str(target / "tokenizer"), str(target / "checkpoints")
        what = f"{target} at checkpoint step {chosen}"
    else:
        if step is not None:
            raise ValueError(f"--step needs a run directory; {model} has no {RUN_FILE}")
        try:
            source = ModelSource.parse(model).pinned()
            model_dir = source.fetch(weights=False)
            read_hf_config(model_dir / "config.json")
        except (ModelLoadError, DataError, OSError) as err:
            raise ValueError(
                f"{model} is neither a run directory (no {RUN_FILE}) nor a model (a directory with config.json, "
                f"tokenizer and model.safetensors, a .gguf file or a hub id): {err}"
            ) from None
        tokenizer_dir = str(model_dir)
        config, checkpoint_dir, chosen, what = SFTConfig(), "", None, str(model)
    updates: dict[str, Any] = {"sharding_axis_dims": (1, -1, 1, 1), "num_slices": 1}
    if dtype:
        updates["dtype"] = dtype
    spec = TrainSpec.from_config(
        config.model_copy(update=updates), model=str(source), tokenizer_dir=tokenizer_dir, checkpoint_dir=checkpoint_dir,
    )
    return spec, chosen, what


class RemoteGenerator:
    """A `GenerationServer` actor holding the model, and the prompts sent to it."""

    def __init__(self, model: str, step: int | None = None, dtype: str | None = None, resources: dict | None = None):
        import ray

        from raysft.workers.generation.generation_server import GenerationServer

        spec, chosen, self.what = server_spec(model, step, dtype)
        connect(1)
        credentials = Credentials.of_driver()
        env = worker_env(spec.backend == "cpu" and not resources)
        resources = dict(resources or {"CPU": 1})
        actor = ray.remote(GenerationServer).options(
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources,
            runtime_env=credentials.runtime_env(env),
        )
        self.actor = actor.remote(spec.as_dict(), chosen, credentials)

    def generate(
        self, prompts: list, sampling: SamplingParams, stop_strings: list[str] = (), truncate: bool = False, warn=print,
    ) -> list[str]:
        result = self._get(self.actor.generate.remote(prompts, dataclasses.asdict(sampling), list(stop_strings), truncate))
        for warning in result["warnings"]:
            warn(f"warning: {warning}")
        return result["answers"]

    def has_chat_template(self) -> bool:
        return self._get(self.actor.has_chat_template.remote())

    @staticmethod
    def _get(ref):
        """The actor's result; its bad-input errors (a prompt too long, a model that does
        not load) as the ValueError they are."""
        import ray

        try:
            return ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.ActorDiedError) as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise


def chat(generator: RemoteGenerator, sampling: SamplingParams, stop_strings: list[str] = (), system: str | None = None,
         read=input, write=print) -> list[dict]:
    """A conversation in the terminal, the whole history sent with every turn; returns it.
    `/reset` starts over, `/exit` or end of input ends."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    write(f"chatting with {generator.what}; /reset starts over, /exit or Ctrl-D ends")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            return history
        if line.strip() in ("/exit", "/quit"):
            return history
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = generator.generate([{"messages": history}], sampling, stop_strings, truncate=True)[0]
        history.append({"role": "assistant", "content": answer})
        write(f"assistant> {answer}")


def read_prompts(prompt: str | None, prompts_file: str | None, raw: bool, system: str | None) -> list:
    """`raysft generate`'s `--prompt` or `--prompts_file` (one JSON string or object a line)
    as the generator takes them (`workers.generation.text_generation`): chat messages (with
    `system` first) unless `raw`."""

    def one(value, where: str):
        if isinstance(value, dict) and "messages" in value:
            return {"messages": value["messages"], **({"tools": value["tools"]} if value.get("tools") else {})}
        text = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected a string, {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        if raw:
            return {"text": text}
        messages = [{"role": "system", "content": system}] if system else []
        return {"messages": messages + [{"role": "user", "content": text}]} if messages else text

    if (prompt is None) == (prompts_file is None):
        raise ValueError("give --prompt or --prompts_file (one of them)")
    if prompt is not None:
        return [one(prompt, "--prompt")]
    prompts = []
    with open(prompts_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                where = f"{prompts_file}: line {number}"
                try:
                    value = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{where}: not valid JSON ({err})") from None
                prompts.append(one(value, where))
    if not prompts:
        raise ValueError(f"{prompts_file}: no prompts")
    return prompts
