"""Render conversations with the tokenizer's chat template and find the trained tokens.

Template-agnostic: an assistant turn is the text that rendering `messages[:i+1]` adds to
rendering `messages[:i]` with the generation prompt, so it covers the turn's content and
its end-of-turn token whatever the template spells them as. Templates with
`{% generation %}` markers use transformers' own assistant mask instead.
"""

from __future__ import annotations

import re

import numpy as np

from raysft.data.errors import BadRow, DataError

_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the rows hold messages but the tokenizer has no chat template; "
            "pass a chat tokenizer as processing_class or set tokenizer.chat_template"
        )


def _render(tokenizer, messages, tools, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def tokens_with_char_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` (no added special tokens: the template has them) and a mask of
    the tokens that overlap any character span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = np.zeros(len(encoded["input_ids"]), bool)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        mask[i] = any(start < b and end > a for a, b in spans)
    return list(encoded["input_ids"]), mask


def _incremental_spans(tokenizer, messages, tools, first_trained: int, where: str) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, messages, tools)
    spans = []
    for i in range(first_trained, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise BadRow(
                f"{where}: the chat template renders turn {i} differently once later turns follow, "
                "so its tokens cannot be located; use a template with {% generation %} markers",
                "template_not_incremental",
            )
        spans.append((len(before), len(through)))
    return full, spans


def conversation_tokens(tokenizer, messages, tools, where: str, train_all: bool, first_trained: int = 0):
    """(ids, trained mask) of a rendered conversation. Trained: every assistant turn from
    message `first_trained` on (with its end-of-turn token), or everything."""
    require_chat_template(tokenizer, where)
    if train_all:
        ids, _ = tokens_with_char_mask(tokenizer, _render(tokenizer, messages, tools), [])
        return ids, np.ones(len(ids), bool)
    if _GENERATION_MARKER.search(tokenizer.chat_template) and first_trained == 0:
        out = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
    full, spans = _incremental_spans(tokenizer, messages, tools, first_trained, where)
    return tokens_with_char_mask(tokenizer, full, spans)
