"""Dataset mixtures: the trained-token share of each source against its weight, the same
mixture from the same seed, and every malformed mixture refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_jsonl
from raysft.data import mixture
from raysft.storage.errors import DataError
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings


def _shares(trained, taken) -> np.ndarray:
    sums = np.array([t[i].sum() for t, i in zip(trained, taken)])
    return sums / sums.sum()


@pytest.mark.parametrize("stopping", mixture.STOPPING)
def test_token_budget_meets_the_weights(stopping):
    rng = np.random.default_rng(0)
    trained = [rng.integers(1, 400, 3000).astype(float), rng.integers(50, 2000, 500).astype(float),
               rng.integers(1, 30, 8000).astype(float)]
    weights = [0.5, 0.3, 0.2]
    taken = mixture.select(trained, weights, seed=7, stopping=stopping)
    np.testing.assert_allclose(_shares(trained, taken), weights, atol=0.01)
    counts = [np.bincount(i, minlength=len(t)) for t, i in zip(trained, taken)]
    if stopping == "first_exhausted":  # nothing repeated, and one source used up
        assert all(c.max() <= 1 for c in counts) and any(c.min() == 1 for c in counts)
    else:  # every document of every source at least once
        assert all(c.min() >= 1 for c in counts) and any(c.max() > 1 for c in counts)
    again = mixture.select(trained, weights, seed=7, stopping=stopping)
    assert all(np.array_equal(a, b) for a, b in zip(taken, again))
    other = mixture.select(trained, weights, seed=8, stopping=stopping)
    assert not all(np.array_equal(a, b) for a, b in zip(taken, other))


def test_without_weights_every_document_once():
    trained = [np.ones(5), np.ones(3)]
    assert [list(i) for i in mixture.select(trained, None, seed=0, stopping="first_exhausted")] == [
        list(range(5)), list(range(3))]


def test_mixture_forms_name_their_sources():
    assert mixture.parts("a.jsonl") == [mixture.Part("", "a.jsonl", None)]
    assert mixture.parts(["data/a.jsonl", "data/b.parquet"]) == [
        mixture.Part("a", "data/a.jsonl", None), mixture.Part("b", "data/b.parquet", None)]
    assert mixture.parts([("data/a.jsonl", 3), ("s3://x/b.jsonl", 1)]) == [
        mixture.Part("a", "data/a.jsonl", 3.0), mixture.Part("b", "s3://x/b.jsonl", 1.0)]
    assert mixture.parts({"chat": {"path": "c.jsonl", "weight": 0.7}, "code": ("d.jsonl", 0.3)}) == [
        mixture.Part("chat", "c.jsonl", 0.7), mixture.Part("code", "d.jsonl", 0.3)]


@pytest.mark.parametrize("dataset, message", [
    ({"a": ("a.jsonl", 0)}, r"train_dataset: source 'a' has weight 0; weights must be > 0"),
    ({"a": {"path": "a.jsonl", "weight": -1}}, r"source 'a' has weight -1; weights must be > 0"),
    ([("x/a.jsonl", 1), ("y/a.jsonl", 1)], r"source name 'a' repeated"),
    ({"a": ("a.jsonl", 1), "b": "b.jsonl"}, r"source 'b' has no weight; give every source a weight or none"),
    ({"a": {"file": "a.jsonl"}}, r"source 'a' must be \{'path': ..., 'weight': ...\}; got keys \['file'\]"),
    ([], r"an empty mixture"),
])
def test_bad_mixtures_are_refused(dataset, message):
    with pytest.raises(DataError, match=message):
        mixture.parts(dataset)


def test_prepared_mixture_trains_each_source_at_its_weight(local_ray, tmp_path, tokenizer_dir):
    """Two sources told apart by their token ids: in the written rows (packed), the
    trained tokens of each are within 1% of its weight; the stats count each source."""
    rng = np.random.default_rng(1)
    short = [{"input_ids": rng.integers(10, 20, rng.integers(4, 20)).tolist()} for _ in range(600)]
    long = [{"input_ids": rng.integers(30, 40, rng.integers(20, 60)).tolist()} for _ in range(200)]
    sources = {"short": {"path": write_jsonl(tmp_path / "short.jsonl", short), "weight": 0.25},
               "long": {"path": write_jsonl(tmp_path / "long.jsonl", long), "weight": 0.75}}
    settings = DataSettings(seq_len=64, packing=True)
    lines = []
    store = prepare_dataset(sources, tokenizer_dir, settings, tmp_path / "store", report=lines.append, mixture_seed=3)
    rows = store.read(np.arange(store.num_rows))
    trained = rows["loss_weights"] > 0
    from_short = (trained & (rows["input_ids"] < 20)).sum()
    from_long = (trained & (rows["input_ids"] >= 30)).sum()
    assert from_short + from_long == trained.sum() == store.meta["supervised_tokens"]
    assert from_long / trained.sum() == pytest.approx(0.75, abs=0.01)
    stats = store.meta["sources"]
    assert stats["short"]["taken_supervised_tokens"] == from_short and stats["long"]["taken_supervised_tokens"] == from_long
    assert stats["long"]["taken_documents"] == 200 and stats["short"]["taken_documents"] < 600  # long ran out first
    assert f"long (tokenized, {tmp_path / 'long.jsonl'}): 200 of 200 documents" in lines[0]

    # The same sources, weights and seed: the same store, reused without reading a row.
    assert prepare_dataset(sources, tokenizer_dir, settings, tmp_path / "store", report=None, mixture_seed=3).path == store.path


def test_per_source_eval_losses_reach_wandb_and_the_loss_plot():
    from raysft.orchestrator.report import plots
    from raysft.orchestrator.tracking import wandb_values

    record = {"event": "eval", "step": 4, "time": 1.0, "loss": 2.0, "perplexity": 7.4, "token_accuracy": 0.5,
              "eval_loss/chat": 1.5, "eval_token_accuracy/chat": 0.6, "eval_loss/code": 2.5}
    assert wandb_values(record) == {"eval/loss": 2.0, "eval/perplexity": 7.4, "eval/token_accuracy": 0.5,
                                    "eval_loss/chat": 1.5, "eval_token_accuracy/chat": 0.6, "eval_loss/code": 2.5}
    series = plots([{"event": "step", "step": 4, "loss": 2.1}, record])["loss.png"][1]
    assert series[2:] == [("eval", "eval_loss/chat", "eval_loss/chat"), ("eval", "eval_loss/code", "eval_loss/code")]


def test_command_line_and_yaml_take_mixtures():
    from pathlib import Path

    from pydantic_settings import CliApp

    from raysft.orchestrator.cli import SFTCommand

    example = Path(__file__).parents[1] / "examples" / "mixture.yaml"
    config, launch = CliApp.run(SFTCommand, cli_args=["--config", str(example), "--repo_id", "model"]).resolve()
    assert config.mixture_stopping == "all_exhausted"
    assert [(p.name, p.weight) for p in mixture.parts(launch["dataset_name"])] == [
        ("conversions", 0.8), ("instructions", 0.1), ("completions", 0.1)]
    assert [p.name for p in mixture.parts(launch["eval_dataset_name"], "eval_dataset")] == ["conversions", "instructions"]
    flag = '{"chat": {"path": "c.jsonl", "weight": 0.7}, "code": ["d.jsonl", 0.3]}'
    _, launch = CliApp.run(SFTCommand, cli_args=["--repo_id", "model", "--dataset_name", flag]).resolve()
    assert mixture.parts(launch["dataset_name"]) == [mixture.Part("chat", "c.jsonl", 0.7), mixture.Part("code", "d.jsonl", 0.3)]
