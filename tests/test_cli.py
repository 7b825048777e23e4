"""The command line: the seed's flags, YAML configs, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
from pydantic_settings import CliApp

from raysft.orchestrator.cli import SFTCommand, accept_bare_bool_flags, main
from conftest import CORPUS, write_jsonl


def _parse(argv):
    return CliApp.run(SFTCommand, cli_args=accept_bare_bool_flags(argv))


def test_seed_command_line_parses():
    command = _parse(
        "--repo_id meta-llama/Llama-3.1-8B-Instruct --dataset_name trl-lib/Capybara --dataset_split train "
        "--dataset_text_field messages --attn_mechanism vanilla --max_sequence_length 2048 --packing True "
        "--total_batch_size 16 --learning_rate 2e-5 --learning_rate_end 5e-6 --num_train_epochs 3 "
        "--do_last_save --save_steps 1000 --use_wandb".split()
    )
    cfg, launch = command.resolve()
    assert launch["repo_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (cfg.packing, cfg.do_last_save, cfg.save_steps, cfg.learning_rate_end) == (True, True, 1000, 5e-6)
    assert (cfg.dataset_text_field, cfg.dataset_split, cfg.attn_mechanism) == ("messages", "train", "vanilla")
    assert cfg.use_wandb and launch["dataset_name"] == "trl-lib/Capybara"


def test_flags_override_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 1.0e-4\nmodel_name: from_yaml\n")
    cfg, _ = _parse(["--config", str(yaml_file), "--repo_id", "m", "--dataset_name", "d", "--learning_rate", "3e-4"]).resolve()
    assert (cfg.learning_rate, cfg.model_name) == (3e-4, "from_yaml")


def test_yaml_can_name_the_model_and_data(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("repo_id: org/model\ndataset_name: train.jsonl\nquiet: true\nlearning_rate: 1.0e-4\n")
    cfg, launch = _parse(["--config", str(yaml_file)]).resolve()
    assert (launch["repo_id"], launch["dataset_name"], launch["quiet"], cfg.learning_rate) == ("org/model", "train.jsonl", True, 1e-4)
    _, launch = _parse(["--config", str(yaml_file), "--dataset_name", "other.jsonl"]).resolve()
    assert launch["dataset_name"] == "other.jsonl"  # flags over the file

    assert main(["sft", "--dataset_name", "train.jsonl"]) == 2
    assert capsys.readouterr().err == "raysft sft: --repo_id is required (a flag, or a key of the --config file)\n"
    yaml_file.write_text("repo_id: org/model\nlearning_rat: 1.0e-4\n")
    assert main(["sft", "--config", str(yaml_file), "--dataset_name", "d.jsonl"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path, capsys):
    missing = tmp_path / "absent"
    assert main(["sft", "--repo_id", str(missing), "--dataset_name", "d.jsonl"]) == 2
    assert capsys.readouterr().err == f"raysft sft: model directory not found: {missing}\n"


def test_bad_config_files_are_one_line(tmp_path, capsys):
    missing = tmp_path / "absent.yaml"
    assert main(["sft", "--config", str(missing), "--repo_id", "m", "--dataset_name", "d"]) == 2
    assert capsys.readouterr().err == f"raysft sft: config file not found: {missing}\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1,\n")
    assert main(["sft", "--config", str(broken), "--repo_id", "m", "--dataset_name", "d"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raysft sft: {broken}: not valid YAML: ") and f'in "{broken}", line 2' in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["sft", "--config", "{missing}", "--repo_id", "m", "--dataset_name", "d"],
    ["sft", "--repo_id", "{missing}", "--dataset_name", "d.jsonl"],
    ["preprocess", "--config", "{missing}"],
    ["plan", "--repo_id", "{missing}", "--tpu_type", "v5p-8"],
    ["export", "--run_dir", "{missing}"],
    ["generate", "--model", "m", "--prompts_file", "{missing}"],
    ["generate", "--model", "{missing}", "--prompt", "hi"],
    ["chat", "--model", "{missing}"],
])
def test_every_command_names_a_missing_file_in_one_line(tmp_path, capsys, argv):
    missing = str(tmp_path / "absent")
    assert main([arg.replace("{missing}", missing) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raysft {argv[0]}: ") and missing in err and err.count("\n") == 1, err


def test_unreadable_files_and_bad_arguments_are_one_line(tmp_path, capsys):
    # A directory where a file belongs: open() fails with an OSError.
    assert main(["generate", "--model", "m", "--prompts_file", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"raysft generate: {tmp_path}: Is a directory\n"
    assert main(["sft", "--repo_id", "m", "--dataset_name", '{"a": {"path": "x.jsonl", "weight": 0.5}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysft sft: ") and "dataset_name" in err and err.count("\n") == 1, err
    for name in ("../escape", "", ".", "..", "a/b"):
        assert main(["sft", "--repo_id", "m", "--dataset_name", "d", "--model_name", name]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"raysft sft: invalid configuration: model_name: model_name {name!r} must name one ")
        assert err.count("\n") == 1


def test_unreachable_object_storage_is_one_line(tmp_path, capsys, s3_server, tiny_model_dir):
    """A bucket that does not exist stops the run in one line naming the URI, before Ray
    starts or any data is read; an unsupported scheme names the supported ones."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "the cat sat"}])
    argv = ["sft", "--repo_id", str(tiny_model_dir), "--dataset_name", str(data), "--model_name", "run"]
    assert main([*argv, "--save_directory", "s3://no-such-bucket/runs"]) == 2
    assert capsys.readouterr().err == (
        "raysft sft: save_directory: cannot write s3://no-such-bucket/runs/run: The specified bucket does not exist\n"
    )
    assert main([*argv, "--save_directory", "hdfs://cluster/runs"]) == 2
    err = capsys.readouterr().err
    assert "hdfs://cluster/runs: unsupported URI scheme 'hdfs'; use a local directory or one of s3://, gs://" in err


def test_preprocess_shows_masks_and_stats_without_training(local_ray, tmp_path, capsys, chat_model_dir):
    rows = [{"messages": [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "on the mat"}]}] * 4
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"save_directory: {tmp_path / 'runs'}\nmax_sequence_length: 64\npacking: true\n")

    code = main(["preprocess", "--config", str(yaml_file), "--repo_id", str(chat_model_dir), "--dataset_name", str(data), "--show", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 rows read, 4 documents kept, dropped: none" in out
    assert out.count("<|im_start|>user\nthe cat?<|im_end|>\n<|im_start|>assistant\n[[on the mat<|im_end|>\n]]") == 2
    assert not (tmp_path / "runs" / "raysft" / "checkpoints").exists()


def test_seed_command_line_trains_then_raysft_export(local_ray, tmp_path, capsys, monkeypatch, chat_model_dir):
    """The seed's command line, flag for flag (local paths for the hub ids, smaller sizes,
    wandb offline), then `raysft export` of its checkpoints."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM as TorchAutoModel

    import raysft as rs

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    chats = [
        {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
        for a, b in zip(CORPUS, CORPUS[1:] + CORPUS[:1])
    ]
    write_jsonl(tmp_path / "capybara.jsonl", chats * 4)
    # Paths relative to where the user stands; Ray's workers run elsewhere.
    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(chat_model_dir, tmp_path)
    seed_flags = (
        f"--repo_id {model} --dataset_name capybara.jsonl --dataset_split train --dataset_text_field messages "
        "--attn_mechanism vanilla --max_sequence_length 128 --packing True --total_batch_size 4 "
        "--learning_rate 2e-3 --learning_rate_end 5e-4 --num_train_epochs 2 --do_last_save --save_steps 2 --use_wandb"
    ).split()
    ours = ["--model_name", "seed_cli", "--save_directory", "runs", "--num_hosts", "2", "--log_steps", "1",
            "--eval_dataset_name", "capybara.jsonl", "--generate_during_eval", "3", "--generation_max_new_tokens", "6"]
    assert main(["sft", *seed_flags, *ours]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "seed_cli"
    # Answers to the first 3 eval conversations at every eval, on the 2-host mesh.
    assert re.search(rf"answers at step 0 \(3 of 3; exact match 0.000 over 3; [\d.]+ s\):\n  Q: {re.escape(CORPUS[0])}\n", out)
    generations = [json.loads(line) for line in (run_dir / "report" / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations[:3]] == CORPUS[:3] and len(generations) % 3 == 0 and len(generations) >= 6
    assert [g["reference"] for g in generations[:3]] == CORPUS[1:4]
    assert f"## 1. {CORPUS[0]}" in (run_dir / "report" / "generations.md").read_text()
    assert f"exported: {run_dir / 'export'}" in out
    assert "24 rows read, 24 documents kept, dropped: none" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final_step"]
    assert final >= 4 and out.count("epoch 2 done") == 1
    assert out.count(f"wandb: no API key found; logging offline under {run_dir / 'wandb'}") == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/eval/generations_*.table.json"))
    assert len(tables) == len(generations) // 3  # one table of answers per eval
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[0] == 2 and saved[-1] == final

    # An earlier step, in bf16, elsewhere: transformers loads it and computes what ours does.
    # (That the latest checkpoint exports to the weights training exported, bit for bit, is
    # shown on object storage in test_fault_tolerance.)
    early = tmp_path / "early"
    capsys.readouterr()
    assert main(["export", "--run_dir", str(run_dir), "--step", "2", "--export_dtype", "bfloat16", "--output_dir", str(early)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"exported: {early}")
    assert load_file(early / "model.safetensors")["model.norm.weight"].dtype.name == "bfloat16"
    ids = np.array([list(range(3, 40))])
    reference = TorchAutoModel.from_pretrained(early, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = reference(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(rs.AutoModelForCausalLM.from_pretrained(early)(ids)), ref_logits, atol=1e-4, rtol=0)
    final_logits = np.asarray(rs.AutoModelForCausalLM.from_pretrained(run_dir / "export")(ids))
    assert np.abs(final_logits - ref_logits).max() > 1e-2, "step 2 and the last step must differ"
    assert (early / "tokenizer_config.json").is_file() and (early / "generation_config.json").is_file()

    # Wrong steps and directories: one line each, before any worker starts.
    capsys.readouterr()
    assert main(["export", "--run_dir", str(run_dir), "--step", "3"]) == 2
    assert capsys.readouterr().err == (
        f"raysft export: {run_dir / 'checkpoints'} has no step 3; complete steps: {', '.join(map(str, saved))}\n"
    )
    assert main(["export", "--run_dir", str(tmp_path)]) == 2
    assert "is not a raysft run directory: no run.json" in capsys.readouterr().err
    _generate_from_the_run(run_dir, tmp_path, capsys)


def _generate_from_the_run(run_dir, tmp_path, capsys):
    """`raysft generate` and `raysft chat` on the run's latest checkpoint: the answers
    the exported model gives in this process, one prompt or a batch of them."""
    from transformers import AutoTokenizer

    import raysft as rs
    from raysft.orchestrator.generate import RemoteGenerator, chat
    from raysft.workers.generation.sampler import SamplingParams
    from raysft.workers.generation.text_generation import TextGenerator

    exported = rs.AutoModelForCausalLM.from_pretrained(run_dir / "export")
    here = TextGenerator(exported.layout, AutoTokenizer.from_pretrained(run_dir / "export"), run_dir / "export", 4096)
    questions = [CORPUS[0], CORPUS[2]]
    expected = here.generate(exported.params, questions, SamplingParams(max_new_tokens=10))

    assert main(["generate", "--model", str(run_dir), "--prompt", questions[1], "--max_new_tokens", "10"]) == 0
    assert capsys.readouterr().out == expected[1] + "\n"
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in questions])
    assert main(["generate", "--model", str(run_dir), "--prompts_file", str(prompts_file), "--max_new_tokens", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["prompt"], line["answer"]) for line in lines] == list(zip(questions, expected))

    # A chat keeps its history: the second answer is the answer to the whole conversation.
    remote, sampling = RemoteGenerator(str(run_dir), step=2), SamplingParams(max_new_tokens=10)
    said, shown = iter([questions[0], questions[1], "/reset", questions[0]]), []

    def read(prompt: str) -> str:  # as input() does, end of input is EOFError
        try:
            return next(said)
        except StopIteration:
            raise EOFError from None

    history = chat(remote, sampling, read=read, write=shown.append)
    assert shown[0] == f"chatting with {run_dir} at checkpoint step 2; /reset starts over, /exit or Ctrl-D ends"
    first, second, after_reset = (line.removeprefix("assistant> ") for line in shown[1:])
    conversation = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": first},
                    {"role": "user", "content": questions[1]}]
    assert remote.generate([{"messages": conversation}], sampling) == [second]
    assert after_reset == first and history == conversation[:1] + [{"role": "assistant", "content": first}]

    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert f"raysft generate: {tmp_path} is neither a run directory (no run.json) nor a model" in capsys.readouterr().err
    assert main(["generate", "--model", str(run_dir), "--prompt", "hi", "--top_p", "0"]) == 2
    assert capsys.readouterr().err == "raysft generate: top_p must be in (0, 1], got 0.0\n"
    assert main(["generate", "--model", str(run_dir), "--prompt", "the cat " * 3000]) == 2
    assert "prompt 0 has" in capsys.readouterr().err


def test_quiet_progress_keeps_the_lines_logs_need(local_ray, capsys, monkeypatch):
    from raysft.orchestrator.progress import ProgressReporter

    step = {"event": "step", "step": 1, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.0, "token_accuracy": 0.1,
            "tokens_per_second": 100.0, "step_time_s": 0.1, "padding_fraction": 0.0, "mfu": 0.1}
    records = [
        {"event": "start", "start_step": 0, "total_steps": 2, "eval_loss": None},
        step,
        {"event": "epoch", "epoch": 1, "step": 1, "loss": 2.0},
        {"event": "restart", "message": "restart 1/3 (failure) after rank 1: ActorDiedError"},
    ]
    for quiet, terminal in ((False, True), (False, False), (True, True)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        with ProgressReporter(quiet=quiet) as progress:
            for record in records:
                progress.note(record)
        out = capsys.readouterr()
        assert "epoch 1 done at step 1: loss 2.0000" in out.out
        assert "restart: restart 1/3 (failure) after rank 1" in out.out
        assert ("step     1  loss 2.0000" in out.out) is not quiet
        assert ("train:" in out.err) is (terminal and not quiet)  # the tqdm bar, on a terminal only


def test_dpo_command_line_parses_trl_names(tmp_path, capsys):
    from raysft.orchestrator.cli import DPOCommand
    from raysft.orchestrator.dpo_config import DPOConfig

    argv = ("--repo_id m --dataset_name trl-lib/ultrafeedback_binarized --beta 0.05 --loss_type ipo "
            "--max_length 512 --max_prompt_length 128 --label_smoothing 0.1 --reference_free").split()
    cfg, launch = CliApp.run(DPOCommand, cli_args=accept_bare_bool_flags(argv, DPOCommand)).resolve()
    assert isinstance(cfg, DPOConfig) and launch["dataset_name"] == "trl-lib/ultrafeedback_binarized"
    assert (cfg.beta, cfg.loss_type, cfg.max_prompt_length, cfg.label_smoothing, cfg.reference_free) == (
        0.05, "ipo", 128, 0.1, True)
    assert cfg.max_sequence_length == 1024 and cfg.packing  # a row holds a pair's two sequences
    settings = cfg.data_settings(cfg.packing)
    assert (settings.dataset_format, settings.max_length, settings.max_prompt_length) == ("preference", 512, 128)
    assert main(["dpo", "--repo_id", "m", "--dataset_name", "d", "--precompute_ref_log_probs", "false"]) == 2
    err = capsys.readouterr().err
    assert "raysft dpo: " in err and "always precomputes" in err and err.count("\n") == 1, err
