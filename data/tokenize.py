"""Ray Data stage: text rows to token ids and per-token loss weights."""

from __future__ import annotations

import numpy as np

from raysft.data.sources import ROW_NUMBER, check_text


class TokenizeText:
    """`map_batches` callable class: the tokenizer is loaded once per Ray worker process.

    Returns per row `input_ids` and `loss_weights` (1 for every token that is a target,
    0 for the first token, which nothing in its document predicts).
    """

    def __init__(self, tokenizer_dir: str, text_field: str, add_special_tokens: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.text_field = text_field
        self.add_special_tokens = add_special_tokens
        self.eos_id = self.tokenizer.eos_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = list(batch[self.text_field])
        rows = batch.get(ROW_NUMBER)
        for i, text in enumerate(texts):
            check_text(text, self.text_field, f"row {rows[i]}" if rows is not None else "a row")
        encoded = self.tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"]
        ids, weights = [], []
        for doc in encoded:
            if self.eos_id is not None and (not doc or doc[-1] != self.eos_id):
                doc = doc + [self.eos_id]  # the model must learn where a document ends
            doc_weights = np.ones(len(doc), np.float32)
            doc_weights[:1] = 0.0
            ids.append(np.asarray(doc, np.int32))
            weights.append(doc_weights)
        return {"input_ids": _ragged(ids), "loss_weights": _ragged(weights)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
