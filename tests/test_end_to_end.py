"""The whole path on a real 2-host local Ray cluster: Ray Data, JaxTrainer, jax.distributed,
orbax resume and Hugging Face export, on a tiny model and a tokenizer trained here."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM as TorchAutoModel
from transformers import AutoTokenizer

import raysft as rs
from raysft.workers.checkpoints.checkpoint import ResumeMismatch
from conftest import CORPUS, write_jsonl


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_jsonl(out / "train.jsonl", [{"text": CORPUS[i % len(CORPUS)], "id": i} for i in range(48)])
    write_jsonl(out / "qa.jsonl", [{"prompt": f"q{i}: {CORPUS[i % 6]}?", "completion": CORPUS[(i + 1) % 6]} for i in range(24)])
    write_jsonl(out / "eval.jsonl", [{"text": text, "id": i} for i, text in enumerate(CORPUS)])
    return out


def _config(tmp_path, **overrides) -> rs.SFTConfig:
    settings = dict(
        model_name="e2e",
        save_directory=str(tmp_path / "runs"),
        max_sequence_length=64,
        total_batch_size=8,
        num_hosts=2,
        cpu_devices_per_host=2,
        learning_rate=3e-3,
        max_training_steps=4,
        num_train_epochs=5,
        save_steps=2,
        log_steps=1,
        eval_steps=2,
        # The memory options on the multi-host path: stacked layers are fsdp-sharded,
        # checkpointed and exported per layer.
        scan_layers=True,
        gradient_checkpointing="dots_saveable",
        loss_chunk_size=16,
        mixture_stopping="all_exhausted",  # the smaller source of a mixture repeated
    )
    return rs.SFTConfig(**{**settings, **overrides})


def test_train_resume_and_export(local_ray, tmp_path, tiny_model_dir, datasets_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = rs.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # A weighted mixture of two formats, and an eval source per kind of data.
    data = dict(
        train_dataset={"text": (datasets_dir / "train.jsonl", 0.6), "qa": (datasets_dir / "qa.jsonl", 0.4)},
        eval_dataset={"text": datasets_dir / "eval.jsonl", "qa_seen": datasets_dir / "qa.jsonl"},
    )

    first = rs.SFTTrainer(arguments=_config(tmp_path), model=model, processing_class=tokenizer, **data).train()

    summary = first.summary
    assert summary["process_count"] == 2
    assert summary["mesh_devices"] == 4
    assert (summary["start_step"], summary["final_step"]) == (0, 4)
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    steps = [r for r in first.metrics if r["event"] == "step"]
    losses = [r["loss"] for r in steps]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for record in steps:  # every metric a user watches, with sane values
        assert record["tokens_per_second"] > 0 and record["step_time_s"] > 0 and 0 < record["mfu"] < 1
        assert 0 <= record["padding_fraction"] < 1 and record["supervised_tokens"] > 0
        # The 2 hosts x 2 devices share this one machine: its peak counts once.
        assert record["mfu_peak"] == "cpu matmul probe x 1 machine(s) (achieved, not peak)"
    # Compilation is timed on its own, once per attempt, and kept out of tokens/s.
    assert [r["step"] for r in first.metrics if r["event"] == "first_step"] == [1]
    evals = [r for r in first.metrics if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]  # eval_steps=2, and the end
    assert evals[-1]["perplexity"] == pytest.approx(np.exp(evals[-1]["loss"]))
    assert evals[-1]["loss"] == summary["eval_loss_end"]
    by_source = [evals[-1]["eval_loss/text"], evals[-1]["eval_loss/qa_seen"]]
    assert min(by_source) < evals[-1]["loss"] < max(by_source)  # the token-weighted mean of the two
    assert summary["eval_end"]["eval_loss/qa_seen"] == evals[-1]["eval_loss/qa_seen"]
    console = capsys.readouterr().out
    assert console.count("eval sources not in the training mixture, evaluated only: qa_seen") == 1
    assert f"loss by source:  text {by_source[0]:.4f}  qa_seen {by_source[1]:.4f}" in console
    assert sorted(int(p.name) for p in first.checkpoint_dir.iterdir() if p.name.isdigit()) == [2, 4]

    # The same run asked for more steps continues from its last checkpoint.
    second = rs.SFTTrainer(
        arguments=_config(tmp_path, max_training_steps=6), model=tiny_model_dir, processing_class=tokenizer, **data
    ).train()
    assert (second.summary["start_step"], second.summary["final_step"]) == (4, 6)
    assert [r["step"] for r in second.metrics if r["event"] == "step"] == [5, 6]
    assert [r["step"] for r in second.metrics if r["event"] == "first_step"] == [5]

    # transformers loads the export and computes what our model computes from it.
    ids = np.array([tokenizer(CORPUS[0])["input_ids"] + tokenizer(CORPUS[1])["input_ids"]])[:, :48]
    reference = TorchAutoModel.from_pretrained(second.export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = reference(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(rs.AutoModelForCausalLM.from_pretrained(second.export_dir)(ids))
    np.testing.assert_allclose(ours, ref_logits, atol=1e-4, rtol=0)
    before = np.asarray(model(ids))
    assert np.abs(ours - before).max() > 1e-2, "export must hold the trained weights"
    assert AutoTokenizer.from_pretrained(second.export_dir)(CORPUS[0])["input_ids"] == tokenizer(CORPUS[0])["input_ids"]
    assert (second.export_dir / "generation_config.json").is_file()

    # The same run directory with other training data: refused before any worker starts,
    # not silently mixed.
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": CORPUS[0]}] * 16)
    changed = rs.SFTTrainer(
        arguments=_config(tmp_path, max_training_steps=8), model=tiny_model_dir, processing_class=tokenizer,
        train_dataset=other,
    )
    # ResumeMismatch itself: a worker's would reach the driver as TrainingFailed.
    with pytest.raises(ResumeMismatch, match=r"^checkpoint step 6 in .*checkpoints was trained on data \w+, this run"):
        changed.train()


def test_missing_text_field_lists_columns(local_ray, tmp_path, tiny_model_dir, datasets_dir):
    trainer = rs.SFTTrainer(
        arguments=_config(tmp_path, dataset_text_field="content"),
        model=tiny_model_dir,
        train_dataset=datasets_dir / "train.jsonl",
    )
    with pytest.raises(ValueError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith(f"{datasets_dir / 'train.jsonl'}: dataset_text_field 'content' is not a column")
    assert message.endswith("available columns: text, id")


def test_tokens_past_the_vocabulary_stop_before_training(local_ray, tmp_path, tiny_model_dir, chat_tokenizer_dirs):
    # The chat tokenizer adds two tokens the tiny model has no embeddings for.
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dirs["chatml"])
    chats = [{"messages": [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "on the mat"}]}] * 8
    trainer = rs.SFTTrainer(
        arguments=_config(tmp_path), model=tiny_model_dir, processing_class=tokenizer,
        train_dataset=write_jsonl(tmp_path / "chats.jsonl", chats),
    )
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError) as err:
        trainer.train()
    assert str(err.value).startswith(
        f"{tmp_path / 'chats.jsonl'}: token id {len(tokenizer) - 1} is past the model's vocabulary ({vocab} tokens in "
        f"{tiny_model_dir / 'config.json'}); the tokenizer ({len(tokenizer)} tokens) has tokens"
    )
    assert not (tmp_path / "runs" / "e2e" / "checkpoints").exists()


def test_missing_model_directory_is_named(tmp_path, datasets_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"^model directory not found: {missing}$"):
        rs.SFTTrainer(arguments=_config(tmp_path), model=missing, train_dataset=datasets_dir / "train.jsonl")


# The seed tutorial's "Basic Usage", as written for EasyDeL; only the import line differs.
SEED_BASIC_USAGE = """
import raysft as ed
import jax
from jax import numpy as jnp
from transformers import AutoTokenizer
from datasets import load_dataset

# Load tokenizer
tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-3.1-8B-Instruct")
if tokenizer.pad_token_id is None:
    tokenizer.pad_token_id = tokenizer.eos_token_id

# Load dataset
dataset = load_dataset(
    "Anthropic/hh-rlhf",
    data_dir="helpful-base",
    split="train[:10%]"  # Using a small subset for demonstration
)

# Load model
model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
    "meta-llama/Llama-3.1-8B-Instruct",
    dtype=jnp.bfloat16
)

# Create SFT config
config = ed.SFTConfig(
    model_name="sft_example",
    save_directory="sft_checkpoints",
    dataset_text_field="chosen",  # Field containing the text to train on
    packing=True,                 # Enable sequence packing for efficiency
    learning_rate=2e-5,
    learning_rate_end=5e-6,
    total_batch_size=16,
    num_train_epochs=3,
    use_wandb=True,
    num_of_sequences=512,         # For packing
)

# Initialize trainer
trainer = ed.SFTTrainer(
    arguments=config,
    model=model,
    train_dataset=dataset,
    processing_class=tokenizer,
)

# Start training
trainer.train()
"""


def test_seed_basic_usage_runs_unchanged_with_wandb_offline_and_report(local_ray, tmp_path, tiny_model_dir, monkeypatch):
    """The hub ids resolve to local folders of the same names (a tiny model, hh-rlhf-shaped
    rows, enough for one step per epoch at the default 2048 tokens in the 10% split)."""
    import shutil

    from PIL import Image

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login either
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "meta-llama" / "Llama-3.1-8B-Instruct")
    rows = [{"chosen": f"\n\nHuman: {a}\n\nAssistant: {b}", "rejected": f"\n\nHuman: {a}\n\nAssistant: no"}
            for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])]
    (tmp_path / "Anthropic" / "hh-rlhf" / "helpful-base").mkdir(parents=True)
    write_jsonl(tmp_path / "Anthropic" / "hh-rlhf" / "helpful-base" / "train.jsonl", rows * 600)

    namespace: dict = {}
    exec(compile(SEED_BASIC_USAGE, "seed_basic_usage.py", "exec"), namespace)
    run_dir = tmp_path / "sft_checkpoints" / "sft_example"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["spec"]["dtype"] == "bfloat16" and summary["spec"]["max_sequence_length"] == 2048
    report = run_dir / "report"
    records = [json.loads(line) for line in (report / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2, 3]
    final = summary["final_step"]
    logged_steps = [step for step in range(1, final + 1) if step % 10 == 0 or step == final]  # log_steps 10
    assert [r["step"] for r in records if r["event"] == "step"] == logged_steps
    assert json.loads((report / "summary.json").read_text())["final_step"] == summary["final_step"]
    for png in ("loss.png", "learning_rate.png", "tokens_per_second.png"):
        with Image.open(report / png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100

    # The offline wandb run holds the config, every step's metrics and the summary.
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb's service process may still be writing the file when finish() returns.
    deadline = time.monotonic() + 60
    while "final_step" not in (logged := _wandb_records(next(runs[0].glob("*.wandb"))))["summary"]:
        assert time.monotonic() < deadline, "the offline wandb run never got its summary"
        time.sleep(1)
    assert logged["config"]["learning_rate"] == 2e-5 and logged["config"]["model_name"] == "sft_example"
    assert [h["_step"] for h in logged["history"] if "train/loss" in h] == logged_steps
    last = [h for h in logged["history"] if "train/loss" in h][-1]
    assert last["train/loss"] == pytest.approx(summary["train_loss"])
    assert logged["summary"]["final_step"] == summary["final_step"]


def _wandb_records(path) -> dict:
    """History rows, config and summary of an offline wandb run file.

    The file is a LevelDB-style log of wandb's protobuf `Record`s (after a 7-byte
    header, 32 KiB blocks of chunks: crc32, length, type, data; types 1 full, 2 first,
    3 middle, 4 last), as wandb's own datastore writes it.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, payloads = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    out = {"history": [], "config": {}, "summary": {}}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind in ("run", "config"):  # the run record carries the initial config
            update = record.run.config.update if kind == "run" else record.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return out
