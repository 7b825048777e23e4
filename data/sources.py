"""Turn what the user passed as a dataset into a Ray Dataset of raw rows.

Rows keep their 1-based line or row number in `_row` where the source has one, so every
error can name file, row and field. JSON lines travel as text in `_json` and are parsed
in the Ray Data tasks: Arrow would reject rows whose fields change type from row to row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import ray

from raysft.data.errors import DataError

ROW_NUMBER = "_row"
RAW_JSON = "_json"
JSON_LINES = (".jsonl", ".json")
READERS = {".parquet": "read_parquet", ".csv": "read_csv", ".jsonl": "read_json", ".json": "read_json"}


def describe(source: Any) -> str:
    """How error messages name `source`: its path, or its type for in-memory datasets."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"{type(source).__name__} passed as dataset"


def _is_remote(source: Any) -> bool:
    return isinstance(source, str) and "://" in source


def looks_like_hub_dataset(source: Any) -> bool:
    return isinstance(source, str) and not Path(source).exists() and not _is_remote(source) \
        and len(source.split("/")) == 2 and not source.endswith(tuple(READERS))


def load_hub_dataset(name: str, split: str = "train", data_dir: str | None = None, kwargs: dict | None = None):
    """`datasets.load_dataset` for a hub `dataset_name` (users with a network)."""
    import datasets

    try:
        return datasets.load_dataset(name, data_dir=data_dir, split=split, **(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - hub, network and config errors alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"dataset {name!r} is not a local file and loading it from the hub failed: {first}") from None


def _read_json_lines(path: Path, on_bad_rows: str, skipped: dict[str, int]) -> tuple[ray.data.Dataset, list[str]]:
    rows, columns = [], None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                if on_bad_rows == "skip":
                    skipped["invalid_utf8"] = skipped.get("invalid_utf8", 0) + 1
                    continue
                raise DataError(f"{path}: row {number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line:
                continue
            if columns is None:  # the first row names the columns the format is detected from
                try:
                    first = json.loads(line)
                    columns = list(first) if isinstance(first, dict) else []
                except ValueError:
                    pass  # reported with its row number by the Ray Data stage
            rows.append({RAW_JSON: line, ROW_NUMBER: number})
    if not rows:
        raise DataError(f"{path}: the dataset has no rows")
    return ray.data.from_items(rows), columns or []


def read_rows(source: Any, on_bad_rows: str = "error", skipped: dict[str, int] | None = None):
    """(Ray Dataset of raw rows, column names). `skipped` counts rows dropped while reading."""
    skipped = {} if skipped is None else skipped
    if isinstance(source, (str, Path)):
        suffix = Path(str(source)).suffix
        if suffix not in READERS:
            raise DataError(f"{source}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
        if not _is_remote(source):
            path = Path(source)
            if not path.is_file():
                raise DataError(f"dataset file not found: {path}")
            if suffix in JSON_LINES:
                return _read_json_lines(path, on_bad_rows, skipped)
            source = str(path.resolve())
        ds = getattr(ray.data, READERS[suffix])(source)
        return ds, [c for c in ds.columns() if c != ROW_NUMBER]
    if isinstance(source, ray.data.Dataset):
        return source, source.columns()
    if type(source).__module__.startswith("datasets"):
        if not hasattr(source, "__len__"):  # IterableDataset: streamed through once, as JSON rows
            rows = [{RAW_JSON: json.dumps(row), ROW_NUMBER: i} for i, row in enumerate(source, start=1)]
            if not rows:
                raise DataError(f"{describe(source)}: the dataset has no rows")
            return ray.data.from_items(rows), list(json.loads(rows[0][RAW_JSON]))
        columns = list(source.column_names)
        source = source.add_column(ROW_NUMBER, list(range(1, len(source) + 1)))
        return ray.data.from_huggingface(source), columns
    raise DataError(
        f"unsupported dataset type {type(source).__name__}; pass a file path, a hub dataset name, "
        "a datasets.Dataset or IterableDataset, or a ray.data.Dataset"
    )


def fingerprint(source: Any) -> str:
    """Identifies the source's content: file bytes, a `datasets` fingerprint, or a Ray plan."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if isinstance(source, (str, Path)):
        return str(source)  # a hub name or remote URI: the name is the identity we have
    hf_fingerprint = getattr(source, "_fingerprint", None)
    if hf_fingerprint:
        return str(hf_fingerprint)
    # A Ray Dataset carries no content hash; its logical plan is the best stable identity.
    return hashlib.sha256(str(source).encode()).hexdigest()
