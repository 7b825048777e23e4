"""Preference objectives against TRL: DPOTrainer's losses, metrics and gradients on the same
tiny model and pairs (our rows pack two pairs in one row), ORPO's and SimPO's formulas."""

from __future__ import annotations

import dataclasses
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


def _trl(model_dir, reference_dir, tmp_path, loss_type: str, pairs=PAIRS):
    """TRL's DPOTrainer with its loss, metrics and policy gradient on the collated PAIRS."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=0.3, report_to=[], use_cpu=True,
                     bf16=False, max_length=64, per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    batch = trainer.data_collator(examples)
    policy.train()
    loss = trainer.compute_loss(policy, batch)
    loss.backward()
    grads = {name: p.grad.detach().numpy() for name, p in policy.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return examples, float(loss), metrics, grads


def _rows(groups):
    """One row per group of TRL-tokenized pairs, each pair's chosen then rejected sequence
    as segments of their own."""
    length = lambda ex: 2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"])  # noqa: E731
    seq_len = -(-max(sum(map(length, group)) for group in groups) // 8) * 8
    rows = {k: np.zeros((len(groups), seq_len), dtype) for k, dtype in
            (("input_ids", np.int32), ("segment_ids", np.int32), ("positions", np.int32), ("loss_weights", np.float32))}
    for row, group in enumerate(groups):
        col, segment = 0, 1
        for ex in group:
            for completion in (ex["chosen_ids"], ex["rejected_ids"]):
                ids = ex["prompt_ids"] + completion
                n = len(ids)
                rows["input_ids"][row, col : col + n] = ids
                rows["segment_ids"][row, col : col + n] = segment
                rows["positions"][row, col : col + n] = np.arange(n)
                rows["loss_weights"][row, col + len(ex["prompt_ids"]) : col + n] = 1.0
                col, segment = col + n, segment + 1
    return {k: jnp.asarray(v) for k, v in rows.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_metrics_and_gradient_match_trl(tmp_path, tiny_model_dir, reference_dir, loss_type):
    examples, trl_loss, trl_metrics, trl_grads = _trl(tiny_model_dir, reference_dir, tmp_path, loss_type)
    layout, params = _ours(tiny_model_dir)
    _, reference_params = _ours(reference_dir)
    objective = Preference(PreferenceSettings(loss_type=loss_type, beta=0.3), loss_chunk_size=8)
    batch = _rows([[examples[0]], examples[1:]])  # pairs 1 and 2 share a row
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


DPO_PAIRS = PAIRS + [{"prompt": "hello", "chosen": " world.", "rejected": " there, friend."}]
DPO_STEPS = 4


def _dpo_config(save_directory, loss_type="sigmoid", **overrides):
    import raysft as rs

    return rs.DPOConfig(**{
        **dict(model_name="dpo", save_directory=str(save_directory), loss_type=loss_type, beta=0.3, max_length=64,
               packing=False, total_batch_size=len(DPO_PAIRS), num_train_epochs=DPO_STEPS, learning_rate=1e-2,
               scheduler="none", weight_decay=0.0, clip_grad=None, log_steps=1, num_hosts=2),
        **overrides})


def _train_dpo(config, model_dir, data, interrupt=None):
    """`rs.DPOTrainer(...).train()`; `interrupt(run_dir)` runs beside it on this thread."""
    import threading

    import raysft as rs

    result = {}

    def run():
        try:
            result["out"] = rs.DPOTrainer(config, model_dir, train_dataset=data, eval_dataset=data, quiet=True).train()
        except BaseException as err:  # noqa: BLE001  (reported below)
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    if interrupt:
        interrupt(config.run_dir, thread)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["out"]


@pytest.fixture(scope="module")
def dpo_run(local_ray, tmp_path_factory, tiny_model_dir):
    """DPO (sigmoid) on 2 hosts, one pair per row: a step is TRL's full batch of 4 pairs."""
    from conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(tmp / "pairs.jsonl", DPO_PAIRS)
    return data, _train_dpo(_dpo_config(tmp / "runs"), tiny_model_dir, data)


def test_dpo_trainer_matches_trl_step_for_step(dpo_run, tmp_path, tiny_model_dir):
    """`rs.DPOTrainer` on 2 hosts: TRL's per-step losses within 1e-4, and the rewards rise."""
    reference = _trl_run_losses(tiny_model_dir, tmp_path / "trl", "sigmoid", DPO_PAIRS, DPO_STEPS)
    _, out = dpo_run
    records = [r for r in out.metrics if r["event"] == "step"]
    np.testing.assert_allclose([r["loss"] for r in records], reference, atol=1e-4, rtol=0)
    assert records[-1]["loss"] < records[0]["loss"] - 0.05  # it trained
    assert records[-1]["rewards/accuracies"] == 1.0 and records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    evals = [r for r in out.metrics if r["event"] == "eval"]
    assert evals[-1]["rewards/accuracies"] == 1.0 and evals[-1]["loss"] < out.summary["eval_start"]["loss"]
    assert out.summary["eval_start"]["rewards/accuracies"] == 0.0  # the policy starts as the reference
    assert out.summary["eval_loss_end"] == evals[-1]["loss"]
    assert (out.run_dir / "report" / "reward_accuracy.png").is_file()


def test_ipo_steps_match_trl_in_micro_batches(tmp_path, tiny_model_dir):
    """The jitted step (2 micro-batches, AdamW) on TRL's tokenized pairs, one pair per row:
    TRL's per-step IPO losses within 1e-4."""
    import optax

    from raysft.workers.training.step import make_train_step

    reference = _trl_run_losses(tiny_model_dir, tmp_path / "trl", "ipo", DPO_PAIRS, DPO_STEPS)
    examples, *_ = _trl(tiny_model_dir, tiny_model_dir, tmp_path / "tokenized", "ipo", DPO_PAIRS)
    batch = _rows([[example] for example in examples])
    layout, params = _ours(tiny_model_dir)
    objective = Preference(PreferenceSettings(loss_type="ipo", beta=0.3), loss_chunk_size=8)
    batch[REFERENCE_FIELD] = objective.reference_log_probs(layout.bind(params), batch)
    optimizer = optax.adamw(1e-2, weight_decay=0.0)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = make_train_step(layout, optimizer, (device, device), gradient_accumulation_steps=2, objective=objective)
    opt_state, losses = optimizer.init(params), []
    for i in range(DPO_STEPS):
        params, opt_state, metrics = step(params, opt_state, batch, {}, i)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference, atol=1e-4, rtol=0)


def test_killed_worker_resumes_dpo_bit_identical_reusing_the_reference(dpo_run, tmp_path, tiny_model_dir):
    """A training worker killed after the checkpoint of step 2: the run resumes there, reads
    the stored reference log-probabilities instead of computing them again, and ends with
    the uninterrupted run's weights, bit for bit."""
    import os
    import signal
    import time

    from safetensors.numpy import load_file

    from raysft.orchestrator.export import checkpoint_steps

    data, base = dpo_run

    def kill_after_step_2(run_dir, thread):
        while thread.is_alive() and not any(s >= 2 for s in checkpoint_steps(run_dir)):
            time.sleep(0.05)
        import ray
        from ray.util.state import list_actors

        # This session's Ray by its address: another on the machine (a second test run) is not ours.
        workers = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        os.kill(workers[-1].pid, signal.SIGKILL)

    out = _train_dpo(_dpo_config(tmp_path / "runs", save_steps=1, max_restarts=1), tiny_model_dir, data,
                     kill_after_step_2)
    starts = [r["start_step"] for r in out.metrics if r["event"] == "start"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 2, starts
    assert [r["kind"] for r in out.metrics if r["event"] == "restart"] == ["failure"]
    computed = [r for r in out.metrics if r["event"] == "note" and "reference log-probabilities" in r["message"]]
    assert len(computed) == 1  # the first attempt's; the second read them
    losses = {r["step"]: r["loss"] for r in out.metrics if r["event"] == "step"}
    assert [losses[s] for s in sorted(losses)] == [r["loss"] for r in base.metrics if r["event"] == "step"]
    ours, theirs = (load_file(next(o.export_dir.glob("*.safetensors"))) for o in (out, base))
    for name in theirs:
        assert np.array_equal(ours[name].view(np.uint32), theirs[name].view(np.uint32)), name


def _random_pair_rows(rows=8, seq_len=48, vocab=97, seed=0):
    """Rows holding 0 to 3 pairs of random lengths (prompt 2-5, completions 1-6 tokens)."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((rows, seq_len), dtype) for k, dtype in
             (("input_ids", np.int32), ("segment_ids", np.int32), ("positions", np.int32), ("loss_weights", np.float32))}
    for r in range(rows):
        col, segment = 0, 1
        for _ in range(rng.integers(0, 4)):
            prompt = rng.integers(0, vocab, rng.integers(2, 6))
            completions = [rng.integers(0, vocab, rng.integers(1, 7)) for _ in range(2)]
            if col + 2 * len(prompt) + sum(map(len, completions)) > seq_len:
                break
            for completion in completions:
                n = len(prompt) + len(completion)
                batch["input_ids"][r, col : col + n] = np.r_[prompt, completion]
                batch["segment_ids"][r, col : col + n] = segment
                batch["positions"][r, col : col + n] = np.arange(n)
                batch["loss_weights"][r, col + len(prompt) : col + n] = 1.0
                col, segment = col + n, segment + 1
    batch[REFERENCE_FIELD] = -rng.uniform(1, 5, (rows, seq_len)).astype(np.float32) * batch["loss_weights"]
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_preference_loss_and_gradient_do_not_depend_on_accumulation_or_mesh(tmp_path, loss_type):
    """Pairs spread unevenly over rows (an empty row too): micro-batches and a dp x fsdp
    mesh give the one-device full-batch loss and gradient (1e-6 relative)."""
    from raysft.workers.models.partition import param_sharding
    from raysft.workers.runtime.mesh import batch_sharding, global_mesh

    layout, params = _ours(save_tiny_model(tmp_path, 97))
    objective = Preference(PreferenceSettings(loss_type=loss_type, beta=0.5), loss_chunk_size=16)
    batch = _random_pair_rows()

    def run(accumulation, mesh=None):
        p, b, rows = params, batch, None
        if mesh is not None:
            rows = batch_sharding(mesh)
            p = {n: jax.device_put(x, param_sharding(mesh, n, x.shape)) for n, x in params.items()}
            b = {k: jax.device_put(v, rows) for k, v in batch.items()}
        fn = make_gradient_fn(layout, gradient_accumulation_steps=accumulation, batch_sharding=rows, objective=objective)
        grads, sums = jax.jit(fn)(p, b)
        return {n: np.asarray(g) for n, g in grads.items()}, float(objective.metrics(sums)["loss"])

    whole, loss = run(1)
    for accumulation, mesh in ((4, None), (2, global_mesh(dp=2, fsdp=2))):
        grads, other = run(accumulation, mesh)
        assert other == pytest.approx(loss, rel=1e-6)
        for name in whole:
            np.testing.assert_allclose(grads[name], whole[name], atol=1e-6 * np.abs(whole[name]).max(), rtol=0,
                                       err_msg=name)


def test_pair_packing_keeps_each_pair_whole_and_in_order():
    """Against the plan's definition: every pair's chosen then rejected sequence, adjacent in
    one row, as segments 2j+1 and 2j+2; no row over its length; every pair placed once."""
    from raysft.data.prepare import _plan
    from raysft.data.settings import DataSettings

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 2 * 500)
    for packing in (True, False):
        p = _plan(lengths, DataSettings(seq_len=128, dataset_format="preference", packing=packing))
        assert sorted(p.doc.tolist()) == list(range(len(lengths)))
        assert np.all(p.doc[0::2] % 2 == 0) and np.all(p.doc[1::2] == p.doc[0::2] + 1)  # chosen, then its rejected
        assert np.all(p.row[0::2] == p.row[1::2]) and np.all(p.col[1::2] == p.col[0::2] + p.n[0::2])
        assert np.all(p.segment[0::2] % 2 == 1) and np.all(p.segment[1::2] == p.segment[0::2] + 1)
        used = np.bincount(p.row, weights=p.n, minlength=p.num_rows)
        assert used.max() <= 128
        if packing:  # best-fit decreasing: far fewer rows than one pair each
            assert p.num_rows < 0.6 * 500 and used.sum() / (p.num_rows * 128) > 0.9
        else:
            assert p.num_rows == 500


def test_bad_preference_rows_name_file_row_and_field(local_ray, tmp_path, tokenizer_dir):
    from raysft.data.prepare import prepare_dataset
    from raysft.data.settings import DataSettings
    from raysft.storage.errors import DataError
    from conftest import write_jsonl

    settings = DataSettings(seq_len=128, dataset_format="preference", max_length=64)
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=f"^{bad}: row 2: missing field 'rejected'$"):
        prepare_dataset(bad, tokenizer_dir, settings, tmp_path / "store", report=None)
    sft = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(DataError, match="preference rows .* train with DPOTrainer"):
        prepare_dataset(sft, tokenizer_dir, DataSettings(seq_len=128), tmp_path / "store", report=None)
    skipped = prepare_dataset(bad, tokenizer_dir, dataclasses.replace(settings, on_bad_rows="skip"),
                              tmp_path / "store", report=None)
    assert skipped.meta["dropped"] == {"missing_field": 1} and skipped.num_rows == 1


def test_reward_metrics_reach_wandb_apart_for_train_and_eval():
    from raysft.orchestrator.tracking import wandb_values

    assert wandb_values({"event": "step", "step": 3, "loss": 0.6, "rewards/margins": 0.2}) == {
        "train/loss": 0.6, "train/rewards/margins": 0.2}
    assert wandb_values({"event": "eval", "step": 3, "rewards/margins": 0.3, "eval_loss/chat": 0.5}) == {
        "eval/rewards/margins": 0.3, "eval_loss/chat": 0.5}


def test_lora_reference_is_the_base_with_the_adapters_off(tmp_path, tiny_model_dir):
    """A LoRA run's reference log-probabilities are the base model's, whatever its adapters
    hold (`lora_init_from` starts from trained ones); the adapted model's differ."""
    import dataclasses as dc

    from raysft.workers.models.lora import LoraSettings, is_adapter
    from raysft.workers.training.references import reference_params

    cfg = ModelConfig.from_hf_dict(read_hf_config(tiny_model_dir / "config.json"))
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, modules=("q_proj", "v_proj", "down_proj"))
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime(), lora)
    base_layout = dc.replace(layout, shapes={n: s for n, s in layout.shapes.items() if not is_adapter(n)})
    params, _ = load_params(tiny_model_dir, base_layout, lambda name, shape: DEVICE)
    rng = np.random.default_rng(0)
    adapters = {n: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32) for n, s in layout.shapes.items()
                if is_adapter(n)}
    objective = Preference(PreferenceSettings())
    batch = _random_pair_rows(rows=2, vocab=cfg.vocab_size)
    base_layout_plain, plain = _ours(tiny_model_dir)
    base = objective.reference_log_probs(base_layout_plain.bind(plain), batch)
    adapted = objective.reference_log_probs(layout.bind({**params, **adapters}), batch)
    reference = objective.reference_log_probs(layout.bind(reference_params({**params, **adapters})), batch)
    np.testing.assert_allclose(np.asarray(reference), np.asarray(base), atol=1e-6)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-2


def test_orpo_loss_and_metrics_match_trls_orpo_trainer(tmp_path, tiny_model_dir):
    """TRL's (experimental) ORPOTrainer on its own tokenized pairs, and the ORPO objective on
    rows holding the same sequences (two pairs sharing a row): the same loss and rewards."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = ORPOConfig(output_dir=str(tmp_path), beta=0.25, report_to=[], use_cpu=True, bf16=False, max_length=64,
                      per_device_train_batch_size=len(PAIRS))
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(policy, batch, train_eval="train")

    def split(prefix, i):  # (prompt ids, completion ids) of one of TRL's padded sequences
        ids, labels = batch[f"{prefix}_input_ids"][i], batch[f"{prefix}_labels"][i]
        ids, labels = ids[batch[f"{prefix}_attention_mask"][i] == 1].tolist(), labels[: int(batch[f"{prefix}_attention_mask"][i].sum())]
        start = int((labels != -100).nonzero()[0])
        return ids[:start], ids[start:]

    examples = []
    for i in range(len(PAIRS)):
        prompt, chosen = split("chosen", i)
        _, rejected = split("rejected", i)
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    layout, params = _ours(tiny_model_dir)
    objective = Preference(PreferenceSettings(loss_type="orpo", beta=0.25), loss_chunk_size=8)
    batch = _rows([[examples[0]], examples[1:]])
    _, sums = jax.jit(make_gradient_fn(layout, objective=objective))(params, batch)
    metrics = objective.metrics(sums)
    assert float(metrics["loss"]) == pytest.approx(float(trl_loss), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert float(metrics[name]) == pytest.approx(float(trl_metrics[name]), abs=1e-5), name


def test_pairs_from_datasets_and_ray_data_prepare_the_rows_a_file_does(local_ray, tmp_path, chat_tokenizer_dirs):
    """The same conversational pairs from a JSON-lines file, a `datasets.Dataset` and a
    Ray Dataset: the same packed rows."""
    import datasets
    import ray

    from conftest import write_jsonl
    from raysft.data.prepare import prepare_dataset
    from raysft.data.rows import ROW_FIELDS
    from raysft.data.settings import DataSettings

    settings = DataSettings(seq_len=128, dataset_format="preference", packing=True)
    pairs = CHAT_PAIRS * 3
    sources = {"file": write_jsonl(tmp_path / "pairs.jsonl", pairs), "datasets": datasets.Dataset.from_list(pairs),
               "ray": ray.data.from_items(pairs)}
    rows = {}
    for name, source in sources.items():
        store = prepare_dataset(source, chat_tokenizer_dirs["chatml"], settings, tmp_path / name, report=None)
        rows[name] = store.read(np.arange(store.num_rows))
        assert store.meta["documents"] == 2 * len(pairs) and store.meta["format"] == "preference"
    for name in ("datasets", "ray"):
        for field in ROW_FIELDS:
            np.testing.assert_array_equal(rows[name][field], rows["file"][field], err_msg=f"{name} {field}")
