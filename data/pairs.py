"""Preference rows (TRL's formats) to pairs of token sequences, as TRL's `DPOTrainer` makes them.

Formats: standard (`prompt`, `chosen`, `rejected` strings; EOS appended to each completion
that lacks it), conversational (message lists; a completion is what the chat template adds
to the prompt rendered with its generation prompt), and an implicit prompt (only `chosen`
and `rejected`: the prompt is their shared beginning, TRL's `extract_prompt`). The prompt
ends where its tokens and the prompt+completion's tokens part (TRL's common prefix), so a
merge across the boundary never trains a prompt token.

Truncation: `max_prompt_length` keeps the prompt's last tokens, `max_completion_length` a
completion's first, and each sequence keeps its first `max_length` tokens (TRL's
`keep_start`); a pair whose prompt alone fills `max_length` is dropped and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from raysft.data.chat import require_chat_template
from raysft.data.formats import Example, _messages, _require_assistant
from raysft.storage.errors import BadRow

PAIR_FIELDS = ("chosen", "rejected")


def extract_prompt(chosen, rejected):
    """TRL's `extract_prompt`: (prompt, chosen, rejected) with the shared beginning of the
    two (characters of strings, messages of conversations) as the prompt."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the completion goes with it
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def pair_example(row: dict[str, Any], where: str) -> Example:
    """A preference row as an `Example` with `prompt`, `chosen` and `rejected`."""
    for name in PAIR_FIELDS:
        if row.get(name) is None:
            raise BadRow(f"{where}: missing field {name!r}", "missing_field")
    conversational = isinstance(row["chosen"], list)
    values = {}
    for name in ("prompt", *PAIR_FIELDS):
        value = row.get(name)
        if value is None:  # an implicit prompt
            continue
        if conversational and isinstance(value, list):
            value = _messages(value, name, where)
        elif conversational or not isinstance(value, str):
            expected = "a message list" if conversational else "a string"
            raise BadRow(f"{where}: field {name!r} holds {type(value).__name__} {repr(value)[:60]}, expected {expected} "
                         "like 'chosen'", "wrong_type")
        values[name] = value
    if "prompt" in values:
        prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(values["chosen"], values["rejected"])
    if conversational:
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            _require_assistant(messages, name, where)
    return Example(prompt=prompt, chosen=chosen, rejected=rejected, tools=row.get("tools"))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class PairLimits:
    max_length: int
    max_prompt_length: int | None = None
    max_completion_length: int | None = None


class PairEncoder:
    """A preference `Example` to two pieces (prompt+chosen, prompt+rejected), each (ids,
    loss weights on its completion)."""

    def __init__(self, tokenizer, limits: PairLimits, template_kwargs: dict | None = None):
        self.tokenizer, self.limits = tokenizer, limits
        self.template_kwargs = template_kwargs or {}

    def _ids(self, value, tools, generation_prompt: bool = False) -> list[int]:
        if isinstance(value, str):
            return list(self.tokenizer(text=value)["input_ids"])
        require_chat_template(self.tokenizer, "the preference rows hold messages:")
        out = self.tokenizer.apply_chat_template(value, tools=tools, add_generation_prompt=generation_prompt,
                                                 tokenize=True, return_dict=True, **self.template_kwargs)
        return list(out["input_ids"])

    def _completion(self, text):
        eos = self.tokenizer.eos_token
        return text if not isinstance(text, str) or eos is None or text.endswith(eos) else text + eos

    def pieces(self, example: Example, where: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """([(ids, weights) of chosen, of rejected], tokens truncated)."""
        chosen, rejected = self._completion(example.chosen), self._completion(example.rejected)
        prompt_ids = self._ids(example.prompt, example.tools, generation_prompt=True) if example.prompt else []
        sequences = [self._ids(example.prompt + completion, example.tools) for completion in (chosen, rejected)]
        prompt_len = min(_common_prefix(prompt_ids, ids) for ids in sequences)
        limits, truncated = self.limits, 0
        if limits.max_prompt_length is not None and prompt_len > limits.max_prompt_length:
            cut = prompt_len - limits.max_prompt_length
            sequences, prompt_len, truncated = [ids[cut:] for ids in sequences], limits.max_prompt_length, 2 * cut
        if prompt_len >= limits.max_length:
            raise BadRow(f"{where}: the prompt alone is {prompt_len} tokens, max_length is {limits.max_length}", "too_long")
        pieces = []
        for name, ids in zip(PAIR_FIELDS, sequences):
            end = len(ids)
            if limits.max_completion_length is not None:
                end = min(end, prompt_len + limits.max_completion_length)
            end = min(end, limits.max_length)
            truncated += len(ids) - end
            if end <= prompt_len:
                raise BadRow(f"{where}: field {name!r} has no completion token after the prompt", "no_trained_tokens")
            weights = np.zeros(end, np.float32)
            weights[prompt_len:] = 1.0
            pieces.append((np.asarray(ids[:end], np.int32), weights))
        return pieces, truncated
