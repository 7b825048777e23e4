"""The whole preparation on Ray Data: every source type, and every bad input named by file,
row and field (or skipped and counted with `on_bad_rows="skip"`)."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import write_jsonl
from raysft.data.errors import DataError
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
