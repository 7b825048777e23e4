"""Ray Data stage: raw rows to token ids and loss weights, one output per row piece.

Runs in `map_batches` actors, so the tokenizer is loaded once per worker process. A row
that cannot be used raises `BadRow` naming file, row and field, or with
`on_bad_rows="skip"` comes back as a dropped record counted by its reason. Rows dropped
by policy (over-length with `truncation="drop"`, nothing left to train) are always
counted, never an error.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from raysft.data.encode import Encoder
from raysft.data.errors import BadRow
from raysft.data.formats import to_example
from raysft.data.settings import DataSettings
from raysft.data.sources import RAW_JSON, ROW_NUMBER

POLICY_DROPS = ("too_long", "no_trained_tokens")
OUTPUT_COLUMNS = ("input_ids", "loss_weights", "row", "piece", "dropped", "truncated_tokens", "dropped_turns")


class EncodeRows:
    def __init__(self, tokenizer_dir: str, settings: dict, fmt: str, source_name: str,
                 formatting_func: Callable | None = None):
        from transformers import AutoTokenizer

        self.settings = DataSettings(**settings)
        self.encoder = Encoder(AutoTokenizer.from_pretrained(tokenizer_dir), self.settings)
        self.fmt, self.source_name, self.formatting_func = fmt, source_name, formatting_func

    def _where(self, row: dict[str, Any]) -> str:
        if row.get(ROW_NUMBER) is not None:
            return f"{self.source_name}: row {row[ROW_NUMBER]}"
        preview = {k: v for k, v in row.items() if not k.startswith("_")}
        return f"{self.source_name}: row {repr(preview)[:80]}"

    def _example(self, row: dict[str, Any], where: str):
        if RAW_JSON in row:
            try:
                row = json.loads(row[RAW_JSON])
            except ValueError as err:
                raise BadRow(f"{where}: malformed JSON line ({err})", "malformed_json") from None
            if not isinstance(row, dict):
                raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}", "wrong_type")
        return to_example(row, self.fmt, self.settings.text_field, where, self.formatting_func)

    def _skip_or_raise(self, err: BadRow) -> None:
        if err.reason not in POLICY_DROPS and self.settings.on_bad_rows != "skip":
            raise err

    def __call__(self, table) -> dict[str, np.ndarray]:
        out: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}

        def emit(ids, weights, number, piece=0, dropped="", truncated=0, turns=0):
            for name, value in zip(OUTPUT_COLUMNS, (ids, weights, number, piece, dropped, truncated, turns)):
                out[name].append(value)

        empty_ids, empty_weights = np.zeros(0, np.int32), np.zeros(0, np.float32)
        parsed = []  # (row number, where, example or the BadRow it raised)
        for row in table.to_pylist():
            where = self._where(row)
            try:
                parsed.append((row.get(ROW_NUMBER) or 0, where, self._example(row, where)))
            except BadRow as err:
                self._skip_or_raise(err)
                parsed.append((row.get(ROW_NUMBER) or 0, where, err))
        self.encoder.tokenize_texts([e for _, _, e in parsed if not isinstance(e, BadRow)])
        for number, where, example in parsed:
            try:
                if isinstance(example, BadRow):
                    raise example
                encoded = self.encoder.encode(example, where)
            except BadRow as err:
                self._skip_or_raise(err)
                emit(empty_ids, empty_weights, number, dropped=err.reason)
                continue
            for i, (ids, weights) in enumerate(encoded.pieces):
                first = i == 0
                emit(ids, weights, number, i, truncated=encoded.truncated_tokens if first else 0,
                     turns=encoded.dropped_turns if first else 0)
        return {
            name: _ragged(values) if name in ("input_ids", "loss_weights") else np.asarray(values)
            for name, values in out.items()
        }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
