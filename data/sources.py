"""Turn what the user passed as a dataset into a Ray Dataset, checking the text field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import ray

from raysft.data.errors import DataError

ROW_NUMBER = "_row"  # 1-based line or row number, carried along for error messages
PARQUET = ".parquet"
JSON_LINES = (".jsonl", ".json")


def describe(source: Any) -> str:
    """How error messages name `source`: its path, or its type for in-memory datasets."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"{type(source).__name__} passed as dataset"


def check_text(value: Any, field: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__} {repr(value)[:60]}, expected a string")


def _missing_column(source: Any, field: str, names: list[str]) -> DataError:
    return DataError(
        f"{describe(source)}: dataset_text_field {field!r} is not a column; "
        f"available columns: {', '.join(n for n in names if n != ROW_NUMBER)}"
    )


def read_json_lines(path: Path, text_field: str) -> ray.data.Dataset:
    """JSONL rows with their line numbers; a bad line is an error naming file, row and field.

    Parsed here rather than by Arrow, which rejects mixed types without saying where.
    """
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
                row = json.loads(line) if line else None
            except (UnicodeDecodeError, ValueError) as err:
                raise DataError(f"{path}: row {number}: malformed JSON line ({err})") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
            if text_field not in row:
                if not rows:
                    raise _missing_column(path, text_field, list(row))
                raise DataError(f"{path}: row {number}: missing field {text_field!r}")
            check_text(row[text_field], text_field, f"{path}: row {number}")
            rows.append({text_field: row[text_field], ROW_NUMBER: number})
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return ray.data.from_items(rows)


def _existing_file(source: str | Path) -> Path:
    path = Path(source)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    return path


def read_rows(source: Any, text_field: str) -> ray.data.Dataset:
    """A Ray Dataset with `text_field` (and row numbers where known) from any source."""
    if isinstance(source, (str, Path)):
        path = _existing_file(source)
        if path.suffix in JSON_LINES:
            return read_json_lines(path, text_field)
        if path.suffix != PARQUET:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
        ds = ray.data.read_parquet(str(path.resolve()))
        names = ds.columns()
    elif isinstance(source, ray.data.Dataset):
        ds, names = source, source.columns()
    elif type(source).__module__.startswith("datasets"):
        names = list(source.column_names)
        if text_field not in names:
            raise _missing_column(source, text_field, names)
        ds = ray.data.from_huggingface(source)
    else:
        raise DataError(
            f"unsupported dataset type {type(source).__name__}; pass a file path, datasets.Dataset or ray.data.Dataset"
        )
    if text_field not in names:
        raise _missing_column(source, text_field, names)
    return ds.select_columns([text_field])


def fingerprint(source: Any) -> str:
    """Identifies the source's content: file bytes, a `datasets` fingerprint, or a Ray plan."""
    if isinstance(source, (str, Path)):
        digest = hashlib.sha256()
        with open(_existing_file(source), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    hf_fingerprint = getattr(source, "_fingerprint", None)
    if hf_fingerprint:
        return str(hf_fingerprint)
    # A Ray Dataset carries no content hash; its logical plan is the best stable identity.
    return hashlib.sha256(str(source).encode()).hexdigest()
