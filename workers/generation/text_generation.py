"""Text in, text out: prompts through the tokenizer (a conversation through its chat
template, with the generation prompt), answers decoded and cut at stop strings.

A prompt is a dict: `{"messages": [...], "tools": [...]}` for a conversation, or
`{"text": "..."}` used as it is (prompt/completion and instruction rows are trained on
their raw text). A plain string is one user message when the tokenizer has a chat
template, else raw text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import jax

from raysft.workers.models.params import ParamLayout
from raysft.storage.locations import local_copy
from raysft.workers.generation.sampler import Placement, PromptTooLong, Sampler, SamplingParams
from raysft.workers.sharded_model import ShardedModel
from raysft.workers.spec import TrainSpec

_END_OF_TURN = re.compile(r"end|eot|eos", re.IGNORECASE)


def stop_token_ids(tokenizer, model_dir: Path | None = None) -> list[int]:
    """EOS as the tokenizer and `generation_config.json` name it, and the special tokens
    the chat template ends a turn with (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...)."""
    ids = {tokenizer.eos_token_id} - {None}
    config = Path(model_dir or "") / "generation_config.json"
    if model_dir is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]:
        if token in template and _END_OF_TURN.search(token):
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(ids)


def as_prompt(prompt: str | dict, tokenizer) -> dict:
    if isinstance(prompt, dict):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return {"messages": [{"role": "user", "content": prompt}]}
    return {"text": prompt}


def prompt_ids(prompt: dict, tokenizer, template_kwargs: dict | None = None, add_special_tokens: bool = True) -> list[int]:
    if "messages" in prompt:
        rendered = tokenizer.apply_chat_template(
            prompt["messages"], tools=prompt.get("tools"), add_generation_prompt=True, tokenize=False,
            **(template_kwargs or {}),
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt["text"], add_special_tokens=add_special_tokens)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids


def normalize(text: str) -> str:
    """What exact match compares: case, surrounding punctuation and runs of spaces aside."""
    return " ".join(text.lower().split()).strip(" .!?")


def exact_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


class TextGenerator:
    @classmethod
    def for_model(cls, model: ShardedModel, spec: TrainSpec) -> "TextGenerator":
        """A generator of `model` with the run's tokenizer and template settings, decoding
        where `placement` puts it (`placement.place(params)` before `generate`)."""
        from transformers import AutoTokenizer

        return cls(
            model.layout, AutoTokenizer.from_pretrained(local_copy(spec.tokenizer_dir)), model.model_dir,
            model.hf_config.get("max_position_embeddings", 1 << 20), Placement.choose(model.mesh),
            spec.chat_template_kwargs, spec.add_special_tokens,
        )

    def __init__(
        self,
        layout: ParamLayout,
        tokenizer,
        model_dir: Path | None,
        max_length: int,
        placement: Placement = Placement(None, replicate=False),
        template_kwargs: dict | None = None,
        add_special_tokens: bool = True,
    ):
        """`placement`: where it decodes (the default: one device, the parameters as given)."""
        self.tokenizer = tokenizer
        self.template_kwargs, self.add_special_tokens = template_kwargs, add_special_tokens
        self.placement = placement
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.sampler = Sampler(layout, stop_token_ids(tokenizer, model_dir), max_length, pad, placement.mesh)

    def encode(self, prompt: str | dict[str, Any]) -> list[int]:
        return prompt_ids(as_prompt(prompt, self.tokenizer), self.tokenizer, self.template_kwargs, self.add_special_tokens)

    def encode_all(
        self, prompts: Sequence[str | dict[str, Any]], truncate: bool = False, room: int = 0
    ) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt; with `truncate`, one that leaves less than `room`
        tokens of the model's context is cut (and a warning says so), else the sampler
        refuses it. A conversation loses its oldest turns, never its system prompt or its
        last message; text loses its first tokens after BOS."""
        limit, encoded, warnings = self.sampler.max_length - room, [], []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if truncate and len(ids) > limit:
                prompt = as_prompt(prompt, self.tokenizer)
                cut, what = self._oldest_turns_cut(prompt, limit) if "messages" in prompt else self._text_cut(ids, limit)
                warnings.append(f"prompt {i} has {len(ids)} tokens, more than the {limit} the model's context of "
                                f"{self.sampler.max_length} leaves beside {room} new ones: {what}")
                ids = cut
            encoded.append(ids)
        return encoded, warnings

    def _oldest_turns_cut(self, prompt: dict, limit: int) -> tuple[list[int], str]:
        """The conversation without its oldest turns (the system prompt and the last message kept)."""
        messages = prompt["messages"]
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        for dropped in range(1, len(turns)):
            ids = self.encode({**prompt, "messages": system + turns[dropped:]})
            if len(ids) <= limit:
                return ids, f"its {dropped} oldest message{'s' if dropped > 1 else ''} were left out"
        raise PromptTooLong(f"the last message alone (with the system prompt) does not fit the {limit} tokens of "
                            "context left for the prompt")

    def _text_cut(self, ids: list[int], limit: int) -> tuple[list[int], str]:
        bos = self.tokenizer.bos_token_id
        keep = 1 if bos is not None and ids[:1] == [bos] else 0
        return ids[:keep] + ids[len(ids) - (limit - keep):], f"its first {len(ids) - limit} tokens were cut"

    def generate(
        self,
        params: dict[str, jax.Array],
        prompts: Sequence[str | dict[str, Any]],
        sampling: SamplingParams,
        stop_strings: Sequence[str] = (),
        truncate: bool = False,
    ) -> list[str]:
        """The answer to each prompt, without its stop token and cut before a stop string."""
        return self.generate_with_warnings(params, prompts, sampling, stop_strings, truncate)[0]

    def generate_with_warnings(self, params, prompts, sampling, stop_strings=(), truncate=False) -> tuple[list[str], list[str]]:
        """`generate`, and what a person should be told (prompts cut to the context)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        stopped = (lambda row, ids: any(s in decode(ids) for s in stop_strings)) if stop_strings else None
        encoded, warnings = self.encode_all(prompts, truncate, room=sampling.max_new_tokens if truncate else 0)
        answers = [decode(ids) for ids in self.sampler.generate(params, encoded, sampling, stopped)]
        return [_cut(answer, stop_strings) for answer in answers], warnings


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    ends = [text.find(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text
