"""One `Example` to token ids and loss weights, cut to fit rows of T tokens.

`loss_weights[t]` is the weight of predicting token t from the tokens before it, so the
first token of every document (and of every split piece) is never trained.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raysft.data.chat import ChatRenderer
from raysft.data.formats import Example
from raysft.data.pairs import PairEncoder, PairLimits
from raysft.data.settings import DataSettings
from raysft.storage.errors import BadRow


@dataclasses.dataclass
class Encoded:
    pieces: list[tuple[np.ndarray, np.ndarray]]  # (input_ids int32, loss_weights float32)
    truncated_tokens: int = 0
    dropped_turns: int = 0


class Encoder:
    def __init__(self, tokenizer, settings: DataSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.chat = ChatRenderer(tokenizer, settings.chat_template_kwargs)
        self.pairs = PairEncoder(tokenizer, PairLimits(settings.max_length or settings.seq_len // 2, settings.max_prompt_length,
                                                       settings.max_completion_length), settings.chat_template_kwargs)

    def _text_ids(self, text: str, special: bool) -> list[int]:
        return self._dedupe_bos(self.tokenizer(text, add_special_tokens=special)["input_ids"], special)

    def _dedupe_bos(self, ids: list[int], special: bool) -> list[int]:
        if special and self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            return ids[1:]  # the text already began with BOS: never two
        return ids

    def tokenize_texts(self, examples: list[Example]) -> None:
        """Tokenize the plain-text examples in one batched call (the fast tokenizer's
        Rust batch path), stored on each example for `encode`."""
        texts = [e for e in examples if e.text is not None and e.text_ids is None]
        if texts:
            special = self.settings.add_special_tokens
            for example, ids in zip(texts, self._batch_ids([e.text for e in texts], special)):
                example.text_ids = self._dedupe_bos(ids, special)

    def _batch_ids(self, texts: list[str], special: bool) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer's batch without offsets: the same ids as the transformers call
        # (which turns off the tokenizer file's own truncation and padding; so must we).
        if backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def _with_eos(self, ids: list[int], mask: list[bool] | np.ndarray):
        mask = list(mask)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            return ids + [self.eos_id], mask + [True]  # the model must learn where it stops
        return ids, mask

    def tokens(self, example: Example, where: str, first_trained: int = 0) -> tuple[list[int], np.ndarray]:
        """(ids, trained mask) before cutting to T."""
        s = self.settings
        if example.text is not None:
            text_ids = example.text_ids if example.text_ids is not None else self._text_ids(example.text, s.add_special_tokens)
            ids, mask = self._with_eos(list(text_ids), [])
            return ids, np.ones(len(ids), bool)
        if example.input_ids is not None:
            ids = list(example.input_ids)
            if example.labels is None or s.train_on_inputs:
                return ids, np.ones(len(ids), bool)
            return ids, np.asarray(example.labels) != -100
        if example.messages is not None:
            return self.chat.conversation_tokens(
                example.messages, example.tools, where,
                train_all=s.train_on_inputs or not s.assistant_only_loss, first_trained=first_trained,
            )
        # prompt / completion
        completion_only = (s.completion_only_loss is not False) and not s.train_on_inputs
        if isinstance(example.prompt, list):
            return self.chat.conversation_tokens(
                example.prompt + example.completion, example.tools, where,
                train_all=not completion_only, first_trained=len(example.prompt),
            )
        prompt_ids = self._text_ids(example.prompt, s.add_special_tokens)
        completion_ids = self._text_ids(example.completion, False)
        ids, mask = self._with_eos(prompt_ids + completion_ids, [not completion_only] * len(prompt_ids) + [True] * len(completion_ids))
        return ids, np.asarray(mask, bool)

    def encode(self, example: Example, where: str) -> Encoded:
        if example.chosen is not None:
            pieces, truncated = self.pairs.pieces(example, where)
            return Encoded(pieces=pieces, truncated_tokens=truncated)
        s, limit = self.settings, self.settings.seq_len
        ids, mask = self.tokens(example, where)
        out = Encoded(pieces=[])
        if len(ids) > limit and s.truncation == "drop_turns" and example.messages is not None:
            ids, mask, out.dropped_turns = self._drop_turns(example, where)
        if len(ids) > limit:
            if s.truncation == "drop":
                raise BadRow(f"{where}: {len(ids)} tokens, over max_sequence_length {limit}", "too_long")
            if s.truncation == "split":
                starts = range(0, len(ids), limit)
                out.pieces = [_piece(ids[a : a + limit], mask[a : a + limit]) for a in starts]
                return self._check_trained(out, where)
            out.truncated_tokens = len(ids) - limit
            ids, mask = ids[:limit], mask[:limit]
        out.pieces = [_piece(ids, mask)]
        return self._check_trained(out, where)

    def _drop_turns(self, example: Example, where: str):
        """Drop the earliest turns after the system prompt until the conversation fits,
        keeping it starting at a user turn and ending with its last exchange whole."""
        messages = example.messages
        system = [m for m in messages[:1] if m["role"] == "system"]
        rest = messages[len(system):]
        dropped = 0
        while True:
            cut = 1
            while cut < len(rest) and rest[cut]["role"] != "user":
                cut += 1
            if cut >= len(rest):
                raise BadRow(
                    f"{where}: the last exchange alone is over max_sequence_length {self.settings.seq_len}", "too_long"
                )
            rest, dropped = rest[cut:], dropped + cut
            ids, mask = self.tokens(dataclasses.replace(example, messages=system + rest), where)
            if len(ids) <= self.settings.seq_len:
                return ids, mask, dropped

    @staticmethod
    def _check_trained(out: Encoded, where: str) -> Encoded:
        if not any(w.sum() for _, w in out.pieces):
            raise BadRow(f"{where}: no token left to train on (check the loss mask settings)", "no_trained_tokens")
        return out


def _piece(ids, mask) -> tuple[np.ndarray, np.ndarray]:
    weights = np.asarray(mask, np.float32).copy()
    weights[:1] = 0.0  # nothing in this row predicts the first token
    return np.asarray(ids, np.int32), weights
