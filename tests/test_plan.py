"""`raysft plan` and the check `raysft sft` makes before a TPU run: compiled for a TPU
slice on this CPU machine, from nothing but the model's config.json."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import write_jsonl
from raysft.orchestrator.cli import main
from test_tpu_compile import SMALL

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu compiles for TPU slices here: pip install 'raysft[tpu]'"
)
V5E_4 = ["--tpu_type", "v5litepod-4", "--dtype", "bfloat16", "--scan_layers", "true"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("config_only")
    (out / "config.json").write_text(json.dumps(SMALL))
    return out


@needs_libtpu
def test_plan_of_a_run_that_fits(config_dir, capsys):
    code = main(["plan", "--repo_id", str(config_dir), "--tpu_type", "v6e-4", "--dtype", "bfloat16", "--scan_layers", "true",
                 "--total_batch_size", "8", "--max_sequence_length", "1024"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on v6e-4: 4 v6e chips (32 GiB HBM each, 31.25 GiB for one program)" in out
    assert "Pallas splash kernel in the step: yes" in out
    for row in ("parameters", "optimizer state", "temporaries (activations)", "total", "compile seconds"):
        assert f"  {row} " in out
    assert "fits: " in out and "GiB headroom" in out
    estimate = out.split("estimate (the TPU compiler's cost model, not a measurement): ")[1]
    seconds, tokens = float(estimate.split(" s per step")[0]), float(estimate.split(", ")[1].split(" tokens/s")[0].replace(",", ""))
    assert 0 < seconds < 1 and tokens == pytest.approx(8 * 1024 / seconds / 4, rel=2e-3)


@needs_libtpu
def test_plan_names_the_smallest_change_that_fits(config_dir, capsys):
    """3,072 rows of 512 tokens need ~18 GiB per v5e chip; half of them at a time fit."""
    code = main(["plan", "--repo_id", str(config_dir), *V5E_4, "--total_batch_size", "3072", "--max_sequence_length", "512",
                 "--estimate", "false"])
    captured = capsys.readouterr()
    assert code == 1
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("raysft plan: does not fit: ") and "per chip, a v5e chip has 15.75 GiB" in last
    assert "smallest change that fits: --gradient_accumulation_steps 2 (" in last
    assert "(train: refused by the compiler for memory" in captured.out


@needs_libtpu
def test_sft_on_tpu_stops_before_preparing_data_when_it_cannot_fit(config_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    code = main(["sft", "--repo_id", str(config_dir), "--dataset_name", str(data), *V5E_4, "--total_batch_size", "3072",
                 "--max_sequence_length", "512", "--save_directory", str(tmp_path / "runs"), "--model_name", "too-big"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("raysft sft: v5litepod-4: does not fit: ") and "plan_before_training=False trains anyway" in err
    assert not (tmp_path / "runs" / "too-big" / "data").exists()


def test_plan_bad_input_is_one_line(config_dir, tmp_path, capsys, monkeypatch):
    def error(*argv):
        assert main(["plan", *argv]) == 2
        return capsys.readouterr().err

    assert "unknown TPU generation 'v9'; known: v2, v3, v4, v5p, v5litepod (v5e), v6e, v7x" in error(
        "--repo_id", str(config_dir), "--tpu_type", "v9-16"
    )
    assert error("--repo_id", str(config_dir)) == (
        "raysft plan: raysft plan needs a TPU target: --tpu_type (e.g. v5p-16), or --accelerator_type with --topology\n"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert error("--repo_id", str(broken), "--tpu_type", "v5p-8").startswith(f"raysft plan: {broken / 'config.json'}: not valid JSON")
    (broken / "config.json").write_text(json.dumps({**SMALL, "architectures": ["GPT2LMHeadModel"]}))
    assert "architecture 'GPT2LMHeadModel' is not supported" in error("--repo_id", str(broken), "--tpu_type", "v5p-8")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a))
    assert error("--repo_id", str(config_dir), "--tpu_type", "v5p-8").startswith(
        "raysft plan: compiling for a TPU slice needs libtpu on this machine: pip install 'raysft[tpu]'"
    )
