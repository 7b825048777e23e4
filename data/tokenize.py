"""Ray Data stage: raw rows to token ids and loss weights, one document per row piece.

Runs in `map_batches` tasks; the tokenizer is loaded once per worker process. Each
batch's documents go to one shard of files in `docs_dir` on the shared store (token ids
and loss weights, back to back); what comes back to the driver is small: per document its
key (file, row, piece), length and place in the shard, for the packing plan and the stats.
A row that cannot be used raises `BadRow` naming file, row and field, or with
`on_bad_rows="skip"` comes back as a dropped record counted by its reason. Rows dropped
by policy (over-length with `truncation="drop"`, nothing left to train) are always
counted, never an error. Where the source has no identity of its own, each row's content
is hashed here (two 64-bit lanes, summed by the driver: the same rows give the same sum
in any order or split into any batches).
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
from etils import epath

from raysft.data.encode import Encoder
from raysft.data.formats import to_example
from raysft.data.pairs import pair_example
from raysft.data.readers import FILE_INDEX, RAW_JSON, ROW_NUMBER
from raysft.data.settings import DataSettings
from raysft.storage.errors import BadRow
from raysft.storage.locations import local_copy, location, save_array

POLICY_DROPS = ("too_long", "no_trained_tokens")
DOC_FILES = ("ids", "weights")


def doc_file(docs_dir: str | Path, shard: str, name: str) -> epath.Path:
    return location(docs_dir) / f"{shard}.{name}.npy"


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_dir: str, tokenizer_key: str, settings: str) -> Encoder:
    """One per worker process, tokenizer (`tokenizer_key`: its files' content, so a
    tokenizer saved again at the same place is loaded again) and settings. Ray runs a job's
    tasks in the same worker processes, so a process loads it once for every batch of
    every dataset it encodes, where an actor pool starts new processes for each dataset."""
    from transformers import AutoTokenizer

    return Encoder(AutoTokenizer.from_pretrained(local_copy(tokenizer_dir)), DataSettings(**json.loads(settings)))


def encode_rows(table, *, tokenizer_dir: str, tokenizer_key: str, settings: dict, **options) -> dict[str, np.ndarray]:
    """One batch's records (`EncodeRows`), with this process's encoder."""
    encoder = _encoder(tokenizer_dir, tokenizer_key, json.dumps(settings, sort_keys=True))
    return EncodeRows(encoder, **options)(table)


class EncodeRows:
    def __init__(self, encoder: Encoder, fmt: str, parts: list[str], docs_dir: str,
                 formatting_func: Callable | None = None, hash_rows: bool = False):
        self.encoder, self.settings = encoder, encoder.settings
        self.fmt, self.parts, self.formatting_func = fmt, parts, formatting_func
        self.docs_dir, self.hash_rows = docs_dir, hash_rows

    def _where(self, row: dict[str, Any]) -> str:
        part = self.parts[row.get(FILE_INDEX) or 0]
        if row.get(ROW_NUMBER) is not None:
            return f"{part}: row {row[ROW_NUMBER]}"
        preview = {k: v for k, v in row.items() if not k.startswith("_")}
        return f"{part}: row {repr(preview)[:80]}"

    def _example(self, row: dict[str, Any], where: str):
        return row_example(row, self.fmt, self.settings.text_field, where, self.formatting_func)

    def _skip_or_raise(self, err: BadRow) -> None:
        if err.reason not in POLICY_DROPS and self.settings.on_bad_rows != "skip":
            raise err

    @staticmethod
    def _content_hash(row: dict[str, Any]) -> tuple[int, int]:
        content = row[RAW_JSON] if RAW_JSON in row else json.dumps(
            {k: v for k, v in row.items() if not k.startswith("_")}, sort_keys=True, default=str
        ).encode()
        digest = hashlib.blake2b(content, digest_size=16).digest()
        return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")

    def __call__(self, table) -> dict[str, np.ndarray]:
        records: list[tuple] = []  # (file, row, piece, length, offset, dropped, truncated, turns, trained, max id, h0, h1)
        ids_out, weights_out, offset = [], [], 0
        parsed = []  # (row, where, example or the BadRow it raised, content hash)
        for row in table.to_pylist():
            where = self._where(row)
            digest = self._content_hash(row) if self.hash_rows else (0, 0)
            try:
                parsed.append((row, where, self._example(row, where), digest))
            except BadRow as err:
                self._skip_or_raise(err)
                parsed.append((row, where, err, digest))
        self.encoder.tokenize_texts([e for _, _, e, _ in parsed if not isinstance(e, BadRow)])
        for row, where, example, digest in parsed:
            key = (row.get(FILE_INDEX) or 0, row.get(ROW_NUMBER) or 0)
            try:
                if isinstance(example, BadRow):
                    raise example
                encoded = self.encoder.encode(example, where)
            except BadRow as err:
                self._skip_or_raise(err)
                records.append((*key, 0, 0, 0, err.reason, 0, 0, 0.0, -1, *digest))
                continue
            for i, (ids, weights) in enumerate(encoded.pieces):
                first = i == 0
                records.append((
                    *key, i, len(ids), offset, "", encoded.truncated_tokens if first else 0,
                    encoded.dropped_turns if first else 0, float(weights.sum()), int(ids.max(initial=-1)),
                    *(digest if first else (0, 0)),
                ))
                ids_out.append(ids)
                weights_out.append(weights)
                offset += len(ids)
        shard = ""
        if ids_out:
            shard = uuid.uuid4().hex
            for name, pieces in zip(DOC_FILES, (ids_out, weights_out)):
                save_array(doc_file(self.docs_dir, shard, name), np.concatenate(pieces))
        columns = list(zip(*records)) if records else [()] * 12
        out = {name: np.asarray(values, dtype) for (name, dtype), values in zip(RECORD_COLUMNS.items(), columns)}
        out["shard"] = np.full(len(records), shard)
        return out


RECORD_COLUMNS = {
    "file": np.int32, "row": np.int64, "piece": np.int32, "length": np.int64, "offset": np.int64,
    "dropped": str, "truncated_tokens": np.int64, "dropped_turns": np.int64, "trained": np.float64,
    "max_id": np.int64, "hash0": np.uint64, "hash1": np.uint64,
}


def row_example(row: dict[str, Any], fmt: str, text_field: str, where: str, formatting_func: Callable | None = None):
    """A read row (a JSON line still as its bytes, or columns) as an `Example`."""
    if RAW_JSON in row:
        try:
            text = row[RAW_JSON].decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRow(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})", "invalid_utf8") from None
        try:
            row = json.loads(text)
        except ValueError as err:
            raise BadRow(f"{where}: malformed JSON line ({err})", "malformed_json") from None
        if not isinstance(row, dict):
            raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}", "wrong_type")
    if fmt == "preference":
        return pair_example(row, where)
    return to_example(row, fmt, text_field, where, formatting_func)
