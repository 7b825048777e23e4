"""Render conversations with the tokenizer's chat template and find the trained tokens.

Template-agnostic: each assistant turn is located in the rendering of the whole
conversation, so what is trained is exactly what the model reads there, end-of-turn
token included. Templates with `{% generation %}` markers use transformers' own
assistant mask instead.

Locating a turn: the prompt for it (the conversation before it, rendered with the
generation prompt) and the turn itself as generated at inference (what rendering
through it adds to that prompt) are aligned with the full rendering. Most templates
render a conversation incrementally and the alignment is exact. Some render a turn
differently once later turns follow and are handled by the same alignment: Qwen3 and
DeepSeek-R1 drop the reasoning of earlier turns (the turn's rendered head is then
absent from the full text), Phi-3.5 ends only the last turn with EOS (a tail that is
absent), Mistral moves the system prompt into the last user turn (a prompt that only
partly agrees). A turn whose own text is nowhere in the full rendering is an error
naming the row and the turn.
"""

from __future__ import annotations

import re

import numpy as np

from raysft.storage.errors import BadRow, DataError

_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the rows hold messages but the tokenizer has no chat template; "
            "pass a chat tokenizer as processing_class or set tokenizer.chat_template"
        )


def tokens_with_char_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` (no added special tokens: the template has them) and a mask of
    the tokens that overlap any character span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = np.zeros(len(encoded["input_ids"]), bool)
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        mask[i] = any(start < b and end > a for a, b in spans)
    return list(encoded["input_ids"]), mask


def _common_prefix(a: str, b: str, a_start: int = 0, b_start: int = 0) -> int:
    """Length of the common prefix of a[a_start:] and b[b_start:]."""
    n = min(len(a) - a_start, len(b) - b_start)
    low, high = 0, n  # binary search over slice equality: C speed on long turns
    while low < high:
        mid = (low + high + 1) // 2
        if a[a_start : a_start + mid] == b[b_start : b_start + mid]:
            low = mid
        else:
            high = mid - 1
    return low


class ChatRenderer:
    """A tokenizer's chat template with the settings' template arguments."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs or {})

    def render(self, messages, tools, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt, **self.kwargs
        )

    def _token_ends(self, text: str) -> list[int]:
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [end for _, end in offsets]

    def _agreement(self, text: str, start: int, piece: str, piece_ends: list[int] | None = None) -> int:
        """How much of `piece` `text` has at `start`, cut back to one of `piece`'s token
        ends (characters alone would match `<t` of `<think>` against `<tool_call>`)."""
        agree = _common_prefix(text, piece, start)
        if 0 < agree < len(piece):
            ends = piece_ends if piece_ends is not None else self._token_ends(piece)
            agree = max((end for end in ends if end <= agree), default=0)
        return agree

    def _prompt_end(self, prompt: str, ends: list[int], text: str, last_message: str) -> int:
        """Where `prompt` (the conversation so far with the generation prompt) ends in
        `text`: their common prefix, or further where `text` goes on with a tail of the
        prompt that holds its last message (Mistral puts the system prompt into the last
        user turn only, so there the two part and meet again at that turn's end). `ends`:
        the prompt's token ends."""
        agree = self._agreement(text, 0, prompt, ends)
        if last_message and agree < len(prompt):
            for cut in [agree] + [end for end in ends if end > agree]:
                tail = prompt[cut:]
                if last_message not in tail:
                    break
                if text.startswith(tail, agree):
                    return agree + len(tail)
        return agree

    def _turn_span(self, messages, tools, i: int, full: str, cursor: int, where: str) -> tuple[int, int]:
        prompt = self.render(messages[:i], tools, generation_prompt=True) if i else ""
        through = self.render(messages[: i + 1], tools)
        if through.startswith(prompt) and full.startswith(through):
            return len(prompt), len(through)  # rendered incrementally: what the alignment finds, without tokenizing
        last = str(messages[i - 1].get("content") or "").strip() if i else ""
        ends = self._token_ends(prompt)
        turn = through[self._prompt_end(prompt, ends, through, last):]  # the turn as generated at inference
        start = max(self._prompt_end(prompt, ends, full, last), cursor)
        # The longest part of the turn the full text has at `start`: a head the full text
        # leaves out (earlier turns' reasoning) is skipped, a tail it lacks is cut at a
        # token boundary (never into the next turn's first token).
        best, best_len = (start, start), 0
        for head in [0] + self._token_ends(turn):
            if len(turn) - head <= best_len:
                break
            agree = self._agreement(full, start, turn[head:])
            if agree > best_len:
                best, best_len = (start, start + agree), agree
        if not self._holds_message(full[best[0] : best[1]], messages[i]):
            raise BadRow(
                f"{where}: turn {i} (assistant): its text cannot be located in the conversation as the chat "
                "template renders it",
                "assistant_not_located",
            )
        return best

    @staticmethod
    def _holds_message(text: str, message: dict) -> bool:
        """The located text holds the message's answer (its content after any reasoning,
        which templates may drop; templates may trim it)."""
        answer = (message.get("content") or "").split("</think>")[-1].strip()
        return bool(text) and answer in text

    def conversation_tokens(self, messages, tools, where: str, train_all: bool, first_trained: int = 0):
        """(ids, trained mask) of a rendered conversation. Trained: every assistant turn
        from message `first_trained` on (with its end-of-turn token), or everything."""
        require_chat_template(self.tokenizer, where)
        if train_all:
            ids, _ = tokens_with_char_mask(self.tokenizer, self.render(messages, tools), [])
            return ids, np.ones(len(ids), bool)
        if _GENERATION_MARKER.search(self.tokenizer.chat_template) and first_trained == 0:
            out = self.tokenizer.apply_chat_template(
                messages, tools=tools or None, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                **self.kwargs,
            )
            return list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
        full = self.render(messages, tools)
        spans, cursor = [], 0
        for i in range(first_trained, len(messages)):
            if messages[i]["role"] == "assistant":
                spans.append(self._turn_span(messages, tools, i, full, cursor, where))
                cursor = spans[-1][1]
        return tokens_with_char_mask(self.tokenizer, full, spans)
