"""Preference objectives against TRL: DPOTrainer's losses, metrics and gradients on the same
tiny model and pairs (our rows pack two pairs in one row), ORPO's and SimPO's formulas."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import save_tiny_model
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig, read_hf_config
from raysft.workers.models.loading import load_params
from raysft.workers.models.params import hf_name
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.training.preference import REFERENCE_FIELD, Preference, PreferenceSettings, pair_losses
from raysft.workers.training.step import make_gradient_fn

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
PAIRS = [
    {"prompt": "question: what is two plus two?", "chosen": " answer: four.", "rejected": " answer: five, or six."},
    {"prompt": "the quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
    {"prompt": "hello world", "chosen": " this is a test.", "rejected": " this is not a test at all."},
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, tiny_model_dir):
    """Another tiny model of the same shape: the reference differs from the policy."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    return save_tiny_model(tmp_path_factory.mktemp("reference"), vocab, seed=1)


def _ours(model_dir):
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime())
    params, _ = load_params(model_dir, layout, lambda name, shape: DEVICE)
    return layout, params


def _trl(model_dir, reference_dir, tmp_path, loss_type: str):
    """TRL's DPOTrainer with its loss, metrics and policy gradient on the collated PAIRS."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=0.3, report_to=[], use_cpu=True,
                     bf16=False, max_length=64, per_device_train_batch_size=len(PAIRS))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    examples = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    batch = trainer.data_collator(examples)
    policy.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    grads = {name: p.grad.detach().numpy() for name, p in policy.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return examples, float(loss), metrics, grads


def _packed_rows(examples):
    """Pair 0 in row 0; pairs 1 and 2 side by side in row 1: chosen, rejected, chosen, rejected."""
    length = lambda ex: 2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"])  # noqa: E731
    seq_len = -(-max(length(examples[0]), length(examples[1]) + length(examples[2])) // 8) * 8
    rows = {k: np.zeros((2, seq_len), dtype) for k, dtype in
            (("input_ids", np.int32), ("segment_ids", np.int32), ("positions", np.int32), ("loss_weights", np.float32))}
    for row, pairs in ((0, [examples[0]]), (1, examples[1:])):
        col, segment = 0, 1
        for ex in pairs:
            for completion in (ex["chosen_ids"], ex["rejected_ids"]):
                ids = ex["prompt_ids"] + completion
                n = len(ids)
                rows["input_ids"][row, col : col + n] = ids
                rows["segment_ids"][row, col : col + n] = segment
                rows["positions"][row, col : col + n] = np.arange(n)
                rows["loss_weights"][row, col + len(ex["prompt_ids"]) : col + n] = 1.0
                col, segment = col + n, segment + 1
    return rows


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_metrics_and_gradient_match_trl(tmp_path, tiny_model_dir, reference_dir, loss_type):
    examples, trl_loss, trl_metrics, trl_grads = _trl(tiny_model_dir, reference_dir, tmp_path, loss_type)
    layout, params = _ours(tiny_model_dir)
    _, reference_params = _ours(reference_dir)
    objective = Preference(PreferenceSettings(loss_type=loss_type, beta=0.3), loss_chunk_size=8)
    batch = {k: jnp.asarray(v) for k, v in _packed_rows(examples).items()}
    batch[REFERENCE_FIELD] = objective.reference_log_probs(layout.bind(reference_params), batch)
    grads, sums = jax.jit(make_gradient_fn(layout, objective=objective, gradient_accumulation_steps=2))(params, batch)
    metrics = objective.metrics(sums)
    assert float(metrics["loss"]) == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-4), name
    assert float(metrics["token_accuracy"]) == pytest.approx(trl_metrics["mean_token_accuracy"], abs=1e-6)
    for name, grad in grads.items():
        hf, transposed = hf_name(name)
        grad = np.asarray(grad).T if transposed else np.asarray(grad)
        np.testing.assert_allclose(grad, trl_grads[hf], atol=2e-5, rtol=1e-4, err_msg=name)


def _trl_method(module: str, cls: str, method: str, **fields):
    """One of TRL's loss methods, on an object holding only what it reads."""
    import importlib

    fn = getattr(getattr(importlib.import_module(module), cls), method)
    return lambda *args: fn(types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **fields), *args)


def test_orpo_and_simpo_match_trls_formulas():
    rng = np.random.default_rng(0)
    chosen, rejected = -rng.uniform(2, 30, 8), -rng.uniform(2, 30, 8)
    chosen_len, rejected_len = rng.integers(3, 20, 8).astype(float), rng.integers(3, 20, 8).astype(float)
    zeros = np.zeros(8)
    avg = lambda x, n: torch.tensor(x / n)  # noqa: E731  (TRL averages both over the completion's tokens)

    orpo = _trl_method("trl.experimental.orpo.orpo_trainer", "ORPOTrainer", "odds_ratio_loss", beta=0.25)
    trl_losses, trl_chosen, trl_rejected, _, _ = orpo(avg(chosen, chosen_len), avg(rejected, rejected_len))
    loss, reward_chosen, reward_rejected = pair_losses(PreferenceSettings("orpo", beta=0.25), chosen, rejected, zeros,
                                                       zeros, chosen_len, rejected_len)
    np.testing.assert_allclose(loss, -trl_losses.numpy(), rtol=1e-6)
    np.testing.assert_allclose(reward_chosen, trl_chosen.numpy(), rtol=1e-6)
    np.testing.assert_allclose(reward_rejected, trl_rejected.numpy(), rtol=1e-6)

    simpo = _trl_method("trl.experimental.cpo.cpo_trainer", "CPOTrainer", "cpo_loss", beta=2.0, simpo_gamma=0.7, alpha=0.0,
                        label_smoothing=0.1, loss_type="simpo")
    trl_losses, trl_chosen, trl_rejected = simpo(avg(chosen, chosen_len), avg(rejected, rejected_len))
    loss, reward_chosen, reward_rejected = pair_losses(
        PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1), chosen, rejected, zeros, zeros,
        chosen_len, rejected_len)
    np.testing.assert_allclose(loss, trl_losses.numpy(), rtol=1e-6)
    np.testing.assert_allclose(reward_chosen, trl_chosen.numpy(), rtol=1e-6)


CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "what is two plus two?"}],
     "chosen": [{"role": "assistant", "content": "four."}], "rejected": [{"role": "assistant", "content": "five."}]},
]
CHAT_IMPLICIT_PAIRS = [
    {"chosen": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "this is a test."}],
     "rejected": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "no."}]},
]
IMPLICIT_PAIRS = [{"chosen": "the quick brown fox jumps over the lazy dog.", "rejected": "the quick brown fox sleeps."}]


@pytest.mark.parametrize(
    "rows, tokenizer",
    [(PAIRS, "plain"), (IMPLICIT_PAIRS, "plain"), (CHAT_PAIRS, "chatml"), (CHAT_IMPLICIT_PAIRS, "chatml")],
    ids=["standard", "implicit-prompt", "conversational", "conversational-implicit-prompt"])
def test_pairs_tokenize_as_trl_tokenizes_them(tmp_path, tokenizer_dir, chat_tokenizer_dirs, rows, tokenizer):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from raysft.data.encode import Encoder
    from raysft.data.settings import DataSettings
    from raysft.data.tokenize import row_example

    tok = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer == "plain" else chat_tokenizer_dirs["chatml"])
    model = save_tiny_model(tmp_path / "model", len(tok))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=DPOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None),
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    encoder = Encoder(tok, DataSettings(seq_len=512, dataset_format="preference"))
    for i, row in enumerate(rows):
        theirs = trainer.train_dataset[i]
        pieces = encoder.encode(row_example(row, "preference", "text", f"row {i}"), f"row {i}").pieces
        for (ids, weights), completion in zip(pieces, ("chosen_ids", "rejected_ids")):
            assert ids.tolist() == theirs["prompt_ids"] + theirs[completion]
            assert weights.tolist() == [0.0] * len(theirs["prompt_ids"]) + [1.0] * len(theirs[completion])


def test_pair_truncation_and_bad_rows():
    from raysft.data.pairs import PairEncoder, PairLimits, pair_example
    from raysft.storage.errors import BadRow

    class Chars:  # one token per character, EOS "$"
        eos_token = "$"

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    row = {"prompt": "abcdef", "chosen": "XYZ", "rejected": "Q"}
    pieces, truncated = PairEncoder(Chars(), PairLimits(8, max_prompt_length=4, max_completion_length=3)).pieces(
        pair_example(row, "r"), "r")
    assert [bytes(ids.tolist()).decode() for ids, _ in pieces] == ["cdefXYZ", "cdefQ$"]  # EOS appended, then cut
    assert [w.tolist() for _, w in pieces] == [[0] * 4 + [1] * 3, [0] * 4 + [1] * 2]
    assert truncated == 2 * 2 + 1  # two prompt tokens from each sequence, the chosen's EOS
    with pytest.raises(BadRow, match="row 7: the prompt alone is 6 tokens, max_length is 6") as err:
        PairEncoder(Chars(), PairLimits(6)).pieces(pair_example(row, "row 7"), "row 7")
    assert err.value.reason == "too_long"
    with pytest.raises(BadRow, match="data.jsonl: row 3: missing field 'rejected'"):
        pair_example({"prompt": "a", "chosen": "b"}, "data.jsonl: row 3")
    with pytest.raises(BadRow, match="row 4: field 'rejected' holds int 5, expected a string"):
        pair_example({"prompt": "a", "chosen": "b", "rejected": 5}, "row 4")


def _trl_run_losses(model_dir, tmp_path, loss_type: str, pairs: list[dict], steps: int) -> list[float]:
    """TRL's DPOTrainer: full-batch AdamW steps at a constant lr, its loss at each."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    losses = []

    class Recording(DPOTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    args = DPOConfig(
        output_dir=str(tmp_path), loss_type=[loss_type], beta=0.3, per_device_train_batch_size=len(pairs),
        max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", max_length=64, use_cpu=True, seed=0,
        bf16=False,
    )
    Recording(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
              train_dataset=datasets.Dataset.from_list(pairs),
              processing_class=AutoTokenizer.from_pretrained(model_dir)).train()
    return losses


@pytest.mark.parametrize("loss_type, hosts, accumulation", [("sigmoid", 1, 1), ("ipo", 2, 2)])
def test_dpo_trainer_matches_trl_step_for_step(local_ray, tmp_path, tiny_model_dir, loss_type, hosts, accumulation):
    """One pair per row, so a step is TRL's full batch; on 2 hosts in 2 micro-batches too."""
    import raysft as rs
    from conftest import write_jsonl

    pairs, steps = PAIRS + [{"prompt": "hello", "chosen": " world.", "rejected": " there, friend."}], 4
    reference = _trl_run_losses(tiny_model_dir, tmp_path / "trl", loss_type, pairs, steps)
    config = rs.DPOConfig(
        model_name="dpo", save_directory=str(tmp_path / "runs"), loss_type=loss_type, beta=0.3, max_length=64,
        packing=False, total_batch_size=len(pairs), num_train_epochs=steps, learning_rate=1e-2, scheduler="none",
        weight_decay=0.0, clip_grad=None, log_steps=1, num_hosts=hosts, gradient_accumulation_steps=accumulation,
    )
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = rs.DPOTrainer(config, tiny_model_dir, train_dataset=data, eval_dataset=data, quiet=True).train()
    records = [r for r in out.metrics if r["event"] == "step"]
    np.testing.assert_allclose([r["loss"] for r in records], reference, atol=1e-4, rtol=0)
    assert records[-1]["loss"] < records[0]["loss"] - 0.05  # it trained
    assert records[-1]["rewards/accuracies"] == 1.0 and records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    evals = [r for r in out.metrics if r["event"] == "eval"]
    assert evals[-1]["rewards/accuracies"] == 1.0 and evals[-1]["loss"] < evals[0]["loss"]
    assert out.summary["eval_loss_end"] == evals[-1]["loss"]
