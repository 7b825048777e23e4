"""The whole preparation on Ray Data: every source type, and every bad input named by file,
row and field (or skipped and counted with `on_bad_rows="skip"`)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from conftest import write_jsonl
from raysft.storage.errors import DataError
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings

GOOD_CHAT = {"messages": [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "on the mat"}]}


def _prepare(source, tokenizer_dir, tmp_path, **settings):
    return prepare_dataset(source, tokenizer_dir, DataSettings(**{"seq_len": 32, **settings}), tmp_path / "s", report=None)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken"'], "row 2: malformed JSON line"),
        (['{"text": "ok"}', '{"body": "x"}'], "row 2: missing field 'text'"),
        (['{"text": "ok"}', '{"text": 5}'], "row 2: field 'text' holds int 5, expected a string"),
        (['{"body": "x"}'], "dataset_text_field 'text' is not a column"),
        ([json.dumps(GOOD_CHAT), '{"messages": [{"role": "bot", "content": "x"}]}'],
         "row 2: field 'messages[0].role': unknown role 'bot'"),
        ([json.dumps(GOOD_CHAT), '{"messages": []}'], "row 2: field 'messages' is an empty conversation"),
        ([json.dumps(GOOD_CHAT), '{"messages": [{"role": "user", "content": "x"}]}'],
         "row 2: field 'messages' has no assistant turn"),
        ([json.dumps(GOOD_CHAT), '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}'],
         "row 2: field 'messages[0].content' holds int 3, expected a string"),
        ([], "the dataset has no rows"),
    ],
)
def test_bad_input_names_file_row_and_field(local_ray, tmp_path, chat_tokenizer_dirs, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    logged = _ErrorRecords()
    logging.getLogger("ray.data").addHandler(logged)
    try:
        with pytest.raises(DataError) as err:
            _prepare(path, chat_tokenizer_dirs["chatml"], tmp_path)
    finally:
        logging.getLogger("ray.data").removeHandler(logged)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert logged.records == []  # Ray Data's own traceback of the failed task stays off the console


class _ErrorRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def test_invalid_utf8_is_named(local_ray, tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: not valid UTF-8"):
        _prepare(path, tokenizer_dir, tmp_path)


def test_messages_need_a_chat_template(local_ray, tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT])
    with pytest.raises(DataError, match=f"^{path}: the rows hold messages but the tokenizer has no chat template"):
        _prepare(path, tokenizer_dir, tmp_path)


def test_skip_counts_every_bad_row_by_reason(local_ray, tmp_path, chat_tokenizer_dirs):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD_CHAT)] * 3 + [
        '{"messages": [{"role": "bot", "content": "x"}]}',
        '{"messages": []}',
        '{"messages": [',
        json.dumps({"messages": [{"role": "user", "content": "the cat " * 30}, {"role": "assistant", "content": "ok"}]}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    store = _prepare(path, chat_tokenizer_dirs["chatml"], tmp_path, on_bad_rows="skip")
    stats = json.loads((store.path / "stats.json").read_text())
    assert stats["rows_read"] == 8 and stats["documents"] == 3
    assert stats["dropped"] == {
        "empty_messages": 1, "invalid_utf8": 1, "malformed_json": 1, "no_trained_tokens": 1, "unknown_role": 1,
    }


def test_sources_parquet_csv_datasets_and_ray(local_ray, tmp_path, tokenizer_dir):
    import datasets
    import ray

    rows = [{"text": f"the cat sat {i}"} for i in range(6)]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    write_jsonl(tmp_path / "d.jsonl", rows)
    iterable = datasets.Dataset.from_list(rows).to_iterable_dataset()
    tokens = set()
    for source in (tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "d.csv", table, iterable,
                   ray.data.from_items(rows)):
        store = _prepare(source, tokenizer_dir, tmp_path / type(source).__name__)
        assert store.meta["documents"] == 6 and store.meta["format"] == "text"
        tokens.add(store.meta["tokens"])
    assert len(tokens) == 1  # every source gives the same tokens


def test_datasets_rows_are_numbered_in_errors(local_ray, tmp_path, tokenizer_dir):
    import datasets

    table = datasets.Dataset.from_list([{"text": "ok"}, {"text": None}])
    with pytest.raises(DataError, match="^Dataset passed as dataset: row 2: missing field 'text'$"):
        _prepare(table, tokenizer_dir, tmp_path)


def test_unreachable_hub_dataset_is_one_line(local_ray, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without a network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="^dataset 'someone/missing-dataset' is not a local file and loading it from the hub failed: "):
        _prepare("someone/missing-dataset", tokenizer_dir, tmp_path)


def test_json_lines_read_in_byte_ranges_equal_the_lines(local_ray, tmp_path):
    """Ranges cut anywhere (inside lines, at newlines, inside multi-byte characters) give
    every non-blank line exactly once, with its line number."""
    from raysft.data.readers import RAW_JSON, ROW_NUMBER, read_files

    lines = ['{"text": "a"}', "", '{"text": "' + "é" * 40 + '"}', "   ", '{"text": "long ' + "x" * 300 + '"}', '{"t": 1}\r']
    lines += [json.dumps({"text": f"row {i}"}) for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(lines).encode())  # no newline at the end
    expected = [(number, line.encode()) for number, line in enumerate(lines, start=1) if line.strip()]
    for chunk in (7, 64, 301, 10**6):
        rows = read_files([str(path)], chunk).take_all()
        assert [(r[ROW_NUMBER], r[RAW_JSON]) for r in rows] == expected, chunk


def test_directory_glob_and_errors_name_the_file(local_ray, tmp_path, tokenizer_dir):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "the cat"}] * 3)
    (folder / "b.jsonl").write_text('{"text": "the dog"}\n{"text": 7}\n')
    with pytest.raises(DataError, match=f"^{folder / 'b.jsonl'}: row 2: field 'text' holds int 7"):
        _prepare(folder, tokenizer_dir, tmp_path / "dir")
    (folder / "b.jsonl").write_text('{"text": "the dog"}\n')
    by_dir = _prepare(folder, tokenizer_dir, tmp_path / "dir")
    by_glob = _prepare(str(folder / "*.jsonl"), tokenizer_dir, tmp_path / "glob")
    assert by_dir.meta["documents"] == by_glob.meta["documents"] == 4
    assert by_dir.fingerprint == by_glob.fingerprint  # the same files, the same content
    with pytest.raises(DataError, match="no dataset files"):
        _prepare(str(tmp_path / "nothing" / "*.jsonl"), tokenizer_dir, tmp_path / "none")


def test_failed_preparation_leaves_no_store(local_ray, tmp_path, tokenizer_dir):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"text": "the cat"})] * 50 + ['{"text": null}']) + "\n")
    with pytest.raises(DataError, match="row 51: missing field 'text'"):
        _prepare(path, tokenizer_dir, tmp_path)
    assert list((tmp_path / "s").iterdir()) == []  # nothing half-written for a later run to reuse


@pytest.mark.parametrize("kind", ["ray", "iterable", "datasets"])
def test_in_memory_datasets_are_fingerprinted_by_content(local_ray, tmp_path, tokenizer_dir, kind):
    """A changed dataset is never mistaken for the prepared one; the same rows again (in
    other blocks, for Ray) reuse it."""
    import datasets
    import ray

    rows = [{"text": f"the cat sat {i}"} for i in range(12)]
    changed = rows[:5] + [{"text": "the dog sat"}] + rows[6:]

    def make(data, blocks=1):
        if kind == "ray":
            return ray.data.from_items(data, override_num_blocks=blocks)
        table = datasets.Dataset.from_list(data)
        return table.to_iterable_dataset() if kind == "iterable" else table

    source = make(rows)
    first = _prepare(source, tokenizer_dir, tmp_path)
    lines = []
    # `datasets` gives an in-memory table a random fingerprint: only that same object is it.
    same = source if kind == "datasets" else make(rows, blocks=3)
    again = prepare_dataset(same, tokenizer_dir, DataSettings(seq_len=32), tmp_path / "s", report=lines.append)
    assert again.fingerprint == first.fingerprint and "prepared before" in lines[0]
    other = _prepare(make(changed), tokenizer_dir, tmp_path)
    assert other.fingerprint != first.fingerprint
    assert other.meta["tokens"] != first.meta["tokens"] or other.read([5])["input_ids"].tolist() != first.read([5])["input_ids"].tolist()


def test_s3_objects_are_read_by_tasks_and_fingerprinted_by_their_metadata(local_ray, tmp_path, tokenizer_dir, s3_server):
    """A real S3-compatible server on 127.0.0.1: the same rows as the local file, errors
    name the object and line, and a rewritten object is prepared again."""
    import boto3

    rows = [{"text": f"the cat sat {i}"} for i in range(8)]
    local = write_jsonl(tmp_path / "d.jsonl", rows)
    client = boto3.client("s3")
    client.create_bucket(Bucket="data")
    client.put_object(Bucket="data", Key="chat/d.jsonl", Body=local.read_bytes())
    from_s3 = _prepare("s3://data/chat/d.jsonl", tokenizer_dir, tmp_path / "s3")
    from_disk = _prepare(local, tokenizer_dir, tmp_path / "disk")
    assert from_s3.meta["tokens"] == from_disk.meta["tokens"] and from_s3.meta["rows_read"] == 8
    for name in ("input_ids", "loss_weights"):
        assert np.array_equal(from_s3.read(np.arange(from_s3.num_rows))[name],
                              from_disk.read(np.arange(from_disk.num_rows))[name])
    lines = []
    prepare_dataset("s3://data/chat/d.jsonl", tokenizer_dir, DataSettings(seq_len=32), tmp_path / "s3" / "s",
                    report=lines.append)
    assert "prepared before" in lines[0]
    time.sleep(1.1)  # S3 modification times are whole seconds
    client.put_object(Bucket="data", Key="chat/d.jsonl", Body=local.read_bytes() + b'{"text": 3}\n')
    with pytest.raises(DataError, match=r"^s3://data/chat/d.jsonl: row 9: field 'text' holds int 3"):
        _prepare("s3://data/chat/d.jsonl", tokenizer_dir, tmp_path / "s3")
    with pytest.raises(DataError, match=r"^dataset not found: s3://data/missing.jsonl$"):
        _prepare("s3://data/missing.jsonl", tokenizer_dir, tmp_path / "s3")
    with pytest.raises(DataError, match=r"^ftp://x/d.jsonl: unsupported URI scheme 'ftp'"):
        _prepare("ftp://x/d.jsonl", tokenizer_dir, tmp_path / "s3")


STALLED_PREPARATION = """
import os, sys, time
from pathlib import Path
import ray
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings
from raysft.data.stall import Stalled

def stuck(row):  # a read that never returns, as on a dead mount
    time.sleep(600)

ray.init(address="local", num_cpus=2)  # never a cluster another test started here
start = time.perf_counter()
try:
    prepare_dataset(Path(sys.argv[1]), Path(sys.argv[2]), DataSettings(seq_len=32), Path(sys.argv[3]),
                    formatting_func=stuck, report=None, timeout_s=3)
except Stalled as err:
    print(f"{time.perf_counter() - start:.1f}", err, flush=True)
ray.shutdown()
os._exit(0)
"""


def test_preparation_without_progress_stops_with_an_error(tmp_path, tokenizer_dir):
    """In a Ray of its own: the stuck encoders are not left holding the session's CPUs."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}] * 4)
    # The stuck read's thread outlives the error; once Ray is shut down, its next Ray call
    # would start (or join, where another test's cluster runs) a Ray of its own, or end the
    # process with status 1 (seen on CI): so the exit status is not what is tested.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_ENABLE_AUTO_CONNECT": "0"}
    run = subprocess.run([sys.executable, "-c", STALLED_PREPARATION, str(data), str(tokenizer_dir), str(tmp_path / "store")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.stdout.strip(), run.stderr[-3000:]
    seconds, message = run.stdout.strip().splitlines()[-1].split(" ", 1)
    assert message.startswith(f"{data}: data preparation made no progress for 3 s while reading and encoding ("), run.stdout
    assert " of 2 CPUs free)" in message
    assert message.endswith("CPUs free): a stuck read, or no node with CPUs to run on; data_timeout_s sets this limit")
    # The 3 s run from the first read; starting Ray Data on a loaded 2-core machine comes before.
    assert float(seconds) < 240, run.stdout
    assert not any((tmp_path / "store").iterdir())  # nothing half-prepared left behind


def test_formatting_func_makes_the_text_of_any_row(local_ray, tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": "the cat", "a": f"sat {i}"} for i in range(6)])
    store = prepare_dataset(data, tokenizer_dir, DataSettings(seq_len=32), tmp_path / "store",
                            formatting_func=lambda row: f"{row['q']} {row['a']}", report=None)
    assert (store.meta["format"], store.meta["documents"]) == ("text", 6)
    other = prepare_dataset(data, tokenizer_dir, DataSettings(seq_len=32), tmp_path / "store",
                            formatting_func=lambda row: row["q"], report=None)
    assert other.path != store.path  # another function, another store


def test_broken_csv_and_parquet_files_are_one_line_naming_the_file(local_ray, tmp_path, tokenizer_dir):
    broken = {"bad.csv": b'text,id\n"the cat",1\n"unterminated,2\nfoo,3\n', "bad.parquet": b"PAR1 not a footer"}
    expected = {"bad.csv": "not readable as CSV (CSV parse error: Expected 2 columns, got 1: ",
                "bad.parquet": "not a readable parquet file ("}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            prepare_dataset(tmp_path / name, tokenizer_dir, DataSettings(seq_len=32), tmp_path / "store", report=None)
        assert str(err.value).startswith(f"{tmp_path / name}: {expected[name]}")
        assert "\n" not in str(err.value)
