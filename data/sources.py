"""What the user passed as a dataset, resolved to rows Ray Data tasks read, a name for
messages and a fingerprint of its content.

Files (local, a directory or glob, `s3://`, `gs://`, `hf://`) and hub datasets (through
their data files) are read by tasks; a `datasets.IterableDataset` is streamed by tasks
shard by shard; none of their rows passes through the driver (a `datasets.Dataset` or
`ray.data.Dataset` the user built is handed to Ray Data as it is). Sources with no identity of their own
(`ray.data.Dataset`, `IterableDataset`) are fingerprinted by the rows' content, hashed by
the encoding tasks (`fingerprint` None here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import ray

from raysft.data.readers import FILE_INDEX, RAW_JSON, ROW_NUMBER, chunk_bytes, first_columns, read_files, read_pieces
from raysft.storage.credentials import NONE, Credentials
from raysft.storage.errors import DataError
from raysft.storage.files import SUFFIXES, file_size, first_line, is_remote, list_files, remote_fingerprint, scan_local

STREAM_BATCH_ROWS = 1000


@dataclasses.dataclass
class Source:
    name: str  # how messages name the dataset
    read: Callable[[], ray.data.Dataset]  # raw rows; `_file` and `_row` where the source has them
    columns: list[str]
    fingerprint: str | None  # None: hashed from the rows' content while encoding
    parts: list[str]  # what `_file` indexes: file paths (or stream shards), for messages
    numbered: bool = True  # every row has `_file` and `_row`: the dataset order, whatever order tasks finish in


def describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"{type(source).__name__} passed as dataset"


def looks_like_hub_dataset(source: Any) -> bool:
    return isinstance(source, str) and not Path(source).exists() and not is_remote(source) \
        and len(source.split("/")) == 2 and not source.endswith(SUFFIXES) and "*" not in source


def resolve(source: Any, hub_options: dict | None = None) -> Source:
    if isinstance(source, (str, Path)) and looks_like_hub_dataset(source):
        return _hub_dataset(str(source), **(hub_options or {}))
    if isinstance(source, (str, Path)):
        return _files(str(source), list_files(source))
    if isinstance(source, ray.data.Dataset):
        return Source(describe(source), lambda: source, source.columns(), None, [describe(source)], numbered=False)
    if type(source).__module__.startswith("datasets"):
        if not hasattr(source, "__len__"):
            return _stream(source, describe(source), None)

        def read():
            return ray.data.from_huggingface(source.add_column(ROW_NUMBER, list(range(1, len(source) + 1))))

        return Source(describe(source), read, list(source.column_names), str(source._fingerprint), [describe(source)])
    raise DataError(
        f"unsupported dataset type {type(source).__name__}; pass a file path, a directory or glob of files, "
        "a hub dataset name, a datasets.Dataset or IterableDataset, or a ray.data.Dataset"
    )


def _files(name: str, files: list[str], identity: list | None = None) -> Source:
    """Files, fingerprinted by their content (local files are read once on the driver for
    that, streaming, which also counts their lines for the reading tasks) unless
    `identity` already pins it (a hub revision). Messages name the files as given; tasks
    open them by absolute path (Ray's workers run in another directory)."""
    urls = [f if is_remote(f) else str(Path(f).resolve()) for f in files]
    chunk = chunk_bytes(sum(file_size(u) for u in urls))
    newlines: dict[str, list[int]] = {}
    if identity is None:
        identity = []
        for url in urls:
            if is_remote(url):
                identity.append(remote_fingerprint(url))
            else:
                digest, newlines[url] = scan_local(url, chunk)
                identity.append(digest)
    return Source(name, lambda: read_files(urls, chunk, newlines), first_columns(urls), _digest(identity), files)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _hub_dataset(name: str, split: str = "train", data_dir: str | None = None, kwargs: dict | None = None) -> Source:
    """A hub dataset read by tasks from its data files (`hf://datasets/<name>@<commit>/...`,
    as `datasets` resolves them for the split), or streamed by tasks where it has no plain
    data files; fingerprinted by the resolved revision."""
    import datasets
    from huggingface_hub import HfApi

    kwargs = kwargs or {}
    try:
        revision = HfApi().dataset_info(name, revision=kwargs.get("revision")).sha
        builder = datasets.load_dataset_builder(name, data_dir=data_dir, **kwargs)
        data_files = (builder.config.data_files or {}).get(split) if "[" not in split else None
        if data_files and all(str(f).endswith(SUFFIXES) for f in data_files):
            files = sorted(str(f) for f in data_files)
            return _files(name, files, identity=[name, split, data_dir, kwargs, revision, files])
        stream = datasets.load_dataset(name, split=split, data_dir=data_dir, streaming=True, **kwargs)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - hub, network and config errors alike
        raise DataError(
            f"dataset {name!r} is not a local file and loading it from the hub failed: {first_line(err)}"
        ) from None
    return _stream(stream, name, _digest([name, split, data_dir, kwargs, revision]), Credentials.of_driver())


def _stream(stream, name: str, fingerprint: str | None, credentials: Credentials = NONE) -> Source:
    """An IterableDataset read shard by shard in tasks, rows as JSON (Arrow would reject
    rows whose fields change type)."""
    shards = max(int(getattr(stream, "num_shards", None) or getattr(stream, "n_shards", 1) or 1), 1)
    try:
        first = next(iter(stream))
    except StopIteration:
        raise DataError(f"{name}: the dataset has no rows") from None
    parts = [name] if shards == 1 else [f"{name} shard {i}" for i in range(shards)]

    def read_shard(piece: dict):
        import pyarrow as pa

        shard = piece["shard"]
        rows = stream.shard(num_shards=shards, index=shard) if shards > 1 else stream
        lines, numbers = [], []
        for number, row in enumerate(rows, start=1):
            lines.append(json.dumps(row, default=str).encode())
            numbers.append(number)
            if len(lines) == STREAM_BATCH_ROWS:
                yield _json_table(pa, lines, shard, numbers)
                lines, numbers = [], []
        if lines:
            yield _json_table(pa, lines, shard, numbers)

    def read():
        return read_pieces("ReadIterableDataset", [{"shard": i} for i in range(shards)], read_shard, credentials)

    return Source(name, read, list(first) if isinstance(first, dict) else [], fingerprint, parts)


def _json_table(pa, lines: list[bytes], shard: int, numbers: list[int]):
    return pa.table({
        RAW_JSON: pa.array(lines, pa.binary()),
        FILE_INDEX: pa.array([shard] * len(lines), pa.int32()),
        ROW_NUMBER: pa.array(numbers, pa.int64()),
    })
