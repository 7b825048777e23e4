"""Tokenized rows, packing and the step-indexed store, against hand-computed expectations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from raysft.data.errors import DataError
from raysft.data.prepare import TextDataSettings, prepare_text_dataset
from raysft.data.rows import best_fit_decreasing, build_rows
from raysft.data.store import RowStore
from raysft.data.tokenize import TokenizeText


def test_tokenize_appends_eos_and_never_trains_the_first_token(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = TokenizeText(str(tokenizer_dir), "text", add_special_tokens=False)(
        {"text": np.array(["the cat", "all that glitters</s>"], dtype=object)}
    )
    first = tok("the cat")["input_ids"] + [tok.eos_token_id]
    assert out["input_ids"][0].tolist() == first
    assert out["loss_weights"][0].tolist() == [0.0] + [1.0] * (len(first) - 1)
    # EOS already present is not doubled.
    assert out["input_ids"][1].tolist() == tok("all that glitters</s>")["input_ids"]
    assert out["input_ids"][1].tolist().count(tok.eos_token_id) == 1


def _brute_force_min_bins(lengths, capacity):
    """Fewest bins over all assignments (tiny inputs only)."""
    for k in range(1, len(lengths) + 1):
        for assignment in itertools.product(range(k), repeat=len(lengths)):
            loads = np.bincount(assignment, weights=lengths, minlength=k)
            if loads.max() <= capacity:
                return k
    return len(lengths)


@pytest.mark.parametrize("seed", range(5))
def test_packing_keeps_every_token_once_and_is_near_optimal(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 17, size=7)
    docs = [rng.integers(3, 100, size=n).astype(np.int32) for n in lengths]
    weights = [np.r_[0.0, np.ones(n - 1)].astype(np.float32) for n in lengths]
    bins = best_fit_decreasing(lengths, 16)
    rows = build_rows(docs, weights, bins, 16)

    assert sorted(i for b in bins for i in b) == list(range(len(docs)))
    assert len(bins) <= _brute_force_min_bins(lengths, 16) * 11 / 9 + 1  # BFD's bound
    for r, members in enumerate(bins):
        seg = rows["segment_ids"][r]
        for s, doc in enumerate(members, start=1):
            np.testing.assert_array_equal(rows["input_ids"][r][seg == s], docs[doc])
            np.testing.assert_array_equal(rows["positions"][r][seg == s], np.arange(len(docs[doc])))
            assert rows["loss_weights"][r][seg == s][0] == 0.0
        assert rows["loss_weights"][r][seg == 0].sum() == 0


def test_prepared_store_is_deterministic_and_reused(local_ray, tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat " * (i % 5 + 1)} for i in range(40)])
    settings = TextDataSettings("text", seq_len=32, packing=True, add_special_tokens=False)
    store = prepare_text_dataset(path, tokenizer_dir, settings, tmp_path / "store")
    again = prepare_text_dataset(path, tokenizer_dir, settings, tmp_path / "store")
    assert again.path == store.path
    assert store.meta["documents"] == 40

    steps = store.steps_per_epoch(4)
    epoch0 = np.concatenate([store.step_rows(7, s, 4) for s in range(steps)])
    epoch1 = np.concatenate([store.step_rows(7, steps + s, 4) for s in range(steps)])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no row twice within an epoch
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch
    np.testing.assert_array_equal(RowStore(store.path).step_rows(7, 3, 4), store.step_rows(7, 3, 4))

    other = prepare_text_dataset(path, tokenizer_dir, TextDataSettings("text", 16, True, False), tmp_path / "store")
    assert other.path != store.path  # settings that change tokens change the fingerprint


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken"'], "row 2: malformed JSON line"),
        (['{"text": "ok"}', '{"body": "x"}'], "row 2: missing field 'text'"),
        (['{"text": "ok"}', '{"text": 5}'], "row 2: field 'text' holds int 5, expected a string"),
        (['{"body": "x"}'], "dataset_text_field 'text' is not a column; available columns: body"),
        ([], "the dataset has no rows"),
    ],
)
def test_bad_rows_name_file_row_and_field(local_ray, tmp_path, tokenizer_dir, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        prepare_text_dataset(path, tokenizer_dir, TextDataSettings("text", 16, False, False), tmp_path / "s")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_invalid_utf8_is_named(local_ray, tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="row 2: malformed JSON line"):
        prepare_text_dataset(path, tokenizer_dir, TextDataSettings("text", 16, False, False), tmp_path / "s")


def test_hf_dataset_column_check_lists_columns(local_ray, tmp_path, tokenizer_dir):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["a"], "answer": ["b"]})
    with pytest.raises(DataError, match="'text' is not a column; available columns: prompt, answer"):
        prepare_text_dataset(ds, tokenizer_dir, TextDataSettings("text", 16, False, False), tmp_path / "s")
