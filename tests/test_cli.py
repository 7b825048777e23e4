"""The command line: the seed's flags, YAML configs, and one-line errors."""

from __future__ import annotations

from pydantic_settings import CliApp

from raysft.orchestrator.cli import SFTCommand, accept_bare_bool_flags, main


def _parse(argv):
    return CliApp.run(SFTCommand, cli_args=accept_bare_bool_flags(argv))


def test_seed_command_line_parses():
    command = _parse(
        "--repo_id meta-llama/Llama-3.1-8B-Instruct --dataset_name trl-lib/Capybara --dataset_split train "
        "--dataset_text_field messages --attn_mechanism vanilla --max_sequence_length 2048 --packing True "
        "--total_batch_size 16 --learning_rate 2e-5 --learning_rate_end 5e-6 --num_train_epochs 3 "
        "--do_last_save --save_steps 1000 --use_wandb".split()
    )
    cfg = command.sft_config()
    assert command.repo_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert (cfg.packing, cfg.do_last_save, cfg.save_steps, cfg.learning_rate_end) == (True, True, 1000, 5e-6)
    assert (cfg.dataset_text_field, cfg.dataset_split, cfg.attn_mechanism) == ("messages", "train", "vanilla")
    assert cfg.use_wandb and command.dataset_name == "trl-lib/Capybara"


def test_flags_override_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 1.0e-4\nmodel_name: from_yaml\n")
    cfg = _parse(["--config", str(yaml_file), "--repo_id", "m", "--dataset_name", "d", "--learning_rate", "3e-4"]).sft_config()
    assert (cfg.learning_rate, cfg.model_name) == (3e-4, "from_yaml")


def test_missing_model_is_one_line(tmp_path, capsys):
    missing = tmp_path / "absent"
    assert main(["sft", "--repo_id", str(missing), "--dataset_name", "d.jsonl"]) == 2
    assert capsys.readouterr().err == f"raysft sft: model directory not found: {missing}\n"


def test_preprocess_shows_masks_and_stats_without_training(local_ray, tmp_path, capsys, tiny_model_dir, chat_tokenizer_dirs):
    import json
    import shutil

    # The tiny model with the ChatML tokenizer, so message rows render.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for file in chat_tokenizer_dirs["chatml"].iterdir():
        shutil.copy2(file, model_dir / file.name)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "on the mat"}]}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"save_directory: {tmp_path / 'runs'}\nmax_sequence_length: 64\npacking: true\n")

    code = main(["preprocess", "--config", str(yaml_file), "--repo_id", str(model_dir), "--dataset_name", str(data), "--show", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 rows read, 4 documents kept, dropped: none" in out
    assert out.count("<|im_start|>user\nthe cat?<|im_end|>\n<|im_start|>assistant\n[[on the mat<|im_end|>\n]]") == 2
    assert not (tmp_path / "runs" / "raysft" / "checkpoints").exists()
