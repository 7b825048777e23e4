"""Tokenized rows, packing and the step-indexed store, against hand-computed expectations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import write_jsonl
from raysft.data.prepare import format_stats, prepare_dataset
from raysft.data.rows import best_fit_decreasing, build_rows, wrapped_rows
from raysft.data.settings import DataSettings
from raysft.data.store import RowStore


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
    settings = DataSettings(seq_len=32, packing=True)
    store = prepare_dataset(path, tokenizer_dir, settings, tmp_path / "store")
    lines = []
    again = prepare_dataset(path, tokenizer_dir, settings, tmp_path / "store", report=lines.append)
    assert again.path == store.path
    assert lines == [f"{format_stats(store.meta)} (prepared before: {store.path})"]  # said, not silent
    assert lines[0].startswith(f"data {path} (text): 40 rows read, 40 documents kept")
    assert store.meta["documents"] == 40

    steps = store.steps_per_epoch(4)
    epoch0 = np.concatenate([store.step_rows(7, s, 4) for s in range(steps)])
    epoch1 = np.concatenate([store.step_rows(7, steps + s, 4) for s in range(steps)])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no row twice within an epoch
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch
    np.testing.assert_array_equal(RowStore(store.path).step_rows(7, 3, 4), store.step_rows(7, 3, 4))

    other = prepare_dataset(path, tokenizer_dir, DataSettings(seq_len=16, packing=True), tmp_path / "store")
    assert other.path != store.path  # settings that change tokens change the fingerprint
    # Prepared again from scratch: the same rows in the same order (the plan is deterministic).
    fresh = prepare_dataset(path, tokenizer_dir, settings, tmp_path / "store2")
    for name in ("input_ids", "segment_ids", "loss_weights"):
        np.testing.assert_array_equal(fresh.read(np.arange(fresh.num_rows))[name], store.read(np.arange(store.num_rows))[name])


def test_wrapped_packing_keeps_every_token_in_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=n).astype(np.int32) for n in (5, 20, 3, 9)]
    weights = [np.r_[0.0, np.ones(len(d) - 1)].astype(np.float32) for d in docs]
    rows = wrapped_rows(docs, weights, 8)

    valid = rows["segment_ids"] > 0
    assert rows["input_ids"][valid].tolist() == np.concatenate(docs).tolist()
    assert valid.sum() == 37 and rows["input_ids"].shape == (5, 8)  # padding only at the end
    for r in range(5):
        for s in np.unique(rows["segment_ids"][r][valid[r]]):
            piece = rows["segment_ids"][r] == s
            assert rows["positions"][r][piece].tolist() == list(range(piece.sum()))
            assert rows["loss_weights"][r][piece][0] == 0  # nothing in the row precedes it
    # Every trained token of the input is trained in the rows, except a piece's first.
    # Row starts at 8, 16, 24 fall inside document 1 (tokens 5..24), 32 inside document 3 (28..36).
    assert rows["loss_weights"].sum() == sum(w.sum() for w in weights) - 4


def _one_at_a_time_best_fit_decreasing(lengths, capacity):
    """Loads of the bins when documents, longest first, each go into the fullest bin with
    room: a scan of every bin per document. Which of several equally full bins is taken
    does not change any later choice, so the loads are the same whatever the tie-break."""
    loads = []
    for need in sorted(lengths.tolist(), reverse=True):
        fits = [i for i, load in enumerate(loads) if load + need <= capacity]
        if fits:
            loads[max(fits, key=lambda i: loads[i])] += need
        else:
            loads.append(need)
    return sorted(loads)


@pytest.mark.parametrize("seed", range(40))
def test_best_fit_decreasing_places_like_one_document_at_a_time(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(1, 80))
    # Repeated lengths (the grouped placement's fast paths) and all sizes of remainder.
    lengths = rng.choice(rng.integers(1, capacity + 1, size=rng.integers(1, 8)), size=rng.integers(0, 400))
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(bins.doc.tolist()) == list(range(len(lengths)))
    loads = [int(lengths[b].sum()) for b in bins]
    assert sorted(loads) == _one_at_a_time_best_fit_decreasing(lengths, capacity)
    for b in bins:  # placed longest first
        assert (np.diff(lengths[b]) <= 0).all()


def test_global_best_fit_decreasing_leaves_almost_no_padding():
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(350), 0.9, 200_000).astype(int), 1, 2048)
    bins = best_fit_decreasing(lengths, 2048)
    loads = np.bincount(np.repeat(np.arange(len(bins)), bins.counts), weights=lengths[bins.doc])
    assert sorted(bins.doc.tolist()) == list(range(len(lengths)))
    assert loads.max() <= 2048
    assert 1 - lengths.sum() / (len(bins) * 2048) < 0.001  # global BFD leaves almost no padding
