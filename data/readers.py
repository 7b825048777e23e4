"""Ray Data datasets of raw rows read from files by tasks, each row with its file (`_file`,
an index into the file list) and 1-based line or row number (`_row`) for error messages.

JSON lines are split into byte ranges whose newlines are counted first (by the driver
while it hashes a local file, by a task per remote file: only integers come back), so
every range's task knows the line number it starts at; the reading tasks cut their
range at line starts and keep each line as raw bytes in `_json`, decoded and parsed in
the encoding stage: Arrow would reject rows whose fields change type, and a bad line
must fail there with its own number. Parquet is
read one row group per task (row numbers from the footer), CSV one file per task.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import numpy as np
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raysft.data.data_nodes import task_options
from raysft.storage.credentials import NONE, Credentials
from raysft.storage.errors import DataError
from raysft.storage.files import count_newlines, filesystem, first_line

FILE_INDEX = "_file"
ROW_NUMBER = "_row"
RAW_JSON = "_json"
JSON_LINES = (".jsonl", ".json")
MAX_CHUNK_BYTES = 32 << 20
MIN_CHUNK_BYTES = 1 << 20
READ_CPUS = 0
_LINE_SEARCH = 1 << 16


def read_files(files: list[str], chunk_bytes: int, newlines: dict[str, list[int]] | None = None) -> ray.data.Dataset:
    """`newlines`: the newline count of each `chunk_bytes` range of a JSON-lines file where
    it is known already (counted while hashing a local file); others are counted by tasks."""
    suffix = "." + files[0].rsplit(".", 1)[-1]
    credentials = Credentials.for_paths(files)
    if suffix in JSON_LINES:
        return _json_lines(files, chunk_bytes, newlines or {}, credentials)
    if suffix == ".parquet":
        pieces = [dict(file=i, url=url, group=g, first_row=first) for i, url in enumerate(files)
                  for g, first in _row_groups(url)]
        return read_pieces("ReadParquetRowGroups", pieces, _read_parquet_group, credentials)
    return read_pieces("ReadCSV", [dict(file=i, url=url) for i, url in enumerate(files)], _read_csv_file, credentials)


def chunk_bytes(total_bytes: int) -> int:
    """Several ranges per CPU, so every encoding task slot has work from the start."""
    cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
    return int(np.clip(total_bytes // (4 * cpus), MIN_CHUNK_BYTES, MAX_CHUNK_BYTES))


def first_columns(files: list[str]) -> list[str]:
    """The columns of the first file, which the format is detected from (JSON lines: the
    keys of the first line, read alone; a line that does not parse is reported with its
    number by the encoding stage). JSON lines without a line are a dataset without rows."""
    url = files[0]
    fs, path = filesystem(url)
    if url.endswith(JSON_LINES):
        with fs.open_input_stream(path) as f:
            line = _first_nonblank_line(f)
        if not line and len(files) == 1:
            raise DataError(f"{url}: the dataset has no rows")
        try:
            first = json.loads(line)
        except ValueError:
            return []
        return list(first) if isinstance(first, dict) else []
    if url.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with fs.open_input_file(path) as f:
                return list(pq.ParquetFile(f).schema_arrow.names)
        except Exception as err:  # noqa: BLE001 - not a parquet file, truncated footer
            raise DataError(f"{url}: not a readable parquet file ({first_line(err)})") from None
    import pyarrow.csv as pacsv

    try:
        with fs.open_input_stream(path) as f:
            return list(pacsv.open_csv(f).schema.names)
    except Exception as err:  # noqa: BLE001 - pyarrow names the CSV row it stopped at
        raise DataError(f"{url}: not readable as CSV ({first_line(err)})") from None


def _first_nonblank_line(stream) -> bytes:
    buffer = b""
    while True:
        piece = stream.read(_LINE_SEARCH)
        buffer += piece
        lines = buffer.split(b"\n")
        for line in lines[:-1] if piece else lines:
            if line.strip():
                return line
        if not piece:
            return b""
        buffer = lines[-1]


class _Pieces(Datasource):
    """One read task per piece (a byte range, a row group, a file, a stream shard): a read
    operator of its own, whose blocks the encoding tasks then take in batches."""

    def __init__(self, name: str, pieces: list[dict], read: Callable[[dict], Iterator]):
        self._name, self._pieces, self._read = name, pieces, read

    def get_name(self) -> str:
        return self._name

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        read = self._read
        return [
            ReadTask(lambda piece=piece: read(piece), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                                    input_files=(piece["url"],) if "url" in piece else None))
            for piece in self._pieces
        ]


def read_pieces(name: str, pieces: list[dict], read: Callable[[dict], Iterator], credentials: Credentials = NONE
                ) -> ray.data.Dataset:
    # Reading costs a hundredth of tokenizing the same bytes: a reader per node keeps the
    # encoders fed, where one per CPU would spend the CPUs starting worker processes. It
    # claims no CPU: the encoders may hold them all, and a reader waiting for one of them
    # would starve the encoders it feeds.
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    return ray.data.read_datasource(_Pieces(name, pieces, credentials.around(read)), concurrency=max(nodes, 1),
                                    num_cpus=READ_CPUS, runtime_env=credentials.runtime_env())


def _json_lines(files: list[str], chunk_bytes: int, newlines: dict[str, list[int]], credentials: Credentials
                ) -> ray.data.Dataset:
    uncounted = [url for url in files if url not in newlines]
    selector = ray.data.DataContext.get_current().execution_options.label_selector
    count = ray.remote(num_cpus=READ_CPUS)(credentials.around(count_newlines)).options(
        runtime_env=credentials.runtime_env(), **task_options(selector))
    counted = ray.get([count.remote(url, chunk_bytes) for url in uncounted])
    newlines = {**newlines, **dict(zip(uncounted, counted))}
    ranges = []
    for i, url in enumerate(files):
        before = np.cumsum([0] + newlines[url][:-1])
        ranges += [dict(file=i, url=url, start=k * chunk_bytes, end=(k + 1) * chunk_bytes, newlines_before=int(n))
                   for k, n in enumerate(before)]
    if not ranges:
        raise DataError(f"{files[0]}: the dataset has no rows")
    return read_pieces("ReadJSONLines", ranges, _read_json_range, credentials)


def _read_json_range(r: dict) -> Iterator:
    """The lines that start in [start, end) of one file, with their line numbers."""
    import pyarrow as pa

    fs, path = filesystem(r["url"])
    with fs.open_input_file(path) as f:
        size = f.size()
        start, end = r["start"], min(r["end"], size)
        data = f.read_at(end - start, start)
        line = r["newlines_before"] + 1
        if start > 0 and f.read_at(1, start - 1) != b"\n":
            cut = data.find(b"\n")  # this line began in the range before: its task reads it
            data = data[cut + 1 :] if cut >= 0 else b""
            line += 1
        if data and not data.endswith(b"\n") and end < size:
            tail, at = [], end  # the last line runs on past the range: read it whole
            while at < size:
                piece = f.read_at(_LINE_SEARCH, at)
                cut = piece.find(b"\n")
                tail.append(piece if cut < 0 else piece[: cut + 1])
                if cut >= 0:
                    break
                at += len(piece)
            data += b"".join(tail)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    numbers = np.arange(line, line + len(lines), dtype=np.int64)
    keep = [i for i, raw in enumerate(lines) if raw.strip()]
    yield pa.table({
        RAW_JSON: pa.array([lines[i] for i in keep], pa.binary()),
        FILE_INDEX: pa.array(np.full(len(keep), r["file"], np.int32)),
        ROW_NUMBER: pa.array(numbers[keep]),
    })


def _row_groups(url: str) -> list[tuple[int, int]]:
    """(row group, first row number) of a parquet file, from its footer alone."""
    import pyarrow.parquet as pq

    fs, path = filesystem(url)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as err:  # noqa: BLE001 - not a parquet file, truncated footer
        raise DataError(f"{url}: not a readable parquet file ({first_line(err)})") from None
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    firsts = np.cumsum([1] + sizes[:-1]) if sizes else []
    return [(g, int(first)) for g, (first, n) in enumerate(zip(firsts, sizes)) if n]


def _numbered(table, file: int, first_row: int):
    import pyarrow as pa

    n = table.num_rows
    table = table.append_column(FILE_INDEX, pa.array(np.full(n, file, np.int32)))
    return table.append_column(ROW_NUMBER, pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))


def _read_parquet_group(r: dict) -> Iterator:
    import pyarrow.parquet as pq

    fs, path = filesystem(r["url"])
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(r["group"])
    yield _numbered(table, r["file"], r["first_row"])


def _read_csv_file(r: dict) -> Iterator:
    import pyarrow.csv as pacsv

    fs, path = filesystem(r["url"])
    try:
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    except Exception as err:  # noqa: BLE001 - pyarrow names the CSV row it stopped at
        raise DataError(f"{r['url']}: not readable as CSV ({first_line(err)})") from None
    yield _numbered(table, r["file"], 1)
