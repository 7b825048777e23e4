"""`raysft plan` and the check `raysft sft` makes before a TPU run: compiled for a TPU
slice on this CPU machine, from nothing but the model's config.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import raysft as rs
from conftest import write_jsonl
from raysft.orchestrator.cli import main
from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.plan import plan, plan_spec
from raysft.workers.runtime.chips import GiB, TPU_CHIPS
from raysft.workers.training.compiled_run import CompiledRun
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
    assert tokens == pytest.approx(8 * 1024 / seconds / 4, rel=2e-3)
    # The step's FLOPs, counted by hand from config.json: no step runs faster than 4 v6e
    # chips at their peak, and a cost model that made it 30x slower would be wrong too.
    d, f, v, layers = SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["vocab_size"], SMALL["num_hidden_layers"]
    attention = SMALL["num_attention_heads"] * SMALL["head_dim"]
    kv = SMALL["num_key_value_heads"] * SMALL["head_dim"]
    matmul_params = v * d + layers * (2 * d * attention + 2 * d * kv + 3 * d * f)  # the input embedding is a lookup
    causal_pairs = 8 * 1024 * 1025 / 2
    flops = 6 * matmul_params * 8 * 1024 + 3 * layers * 4 * attention * causal_pairs
    fastest = flops / (4 * 918e12)
    assert fastest < seconds < 30 * fastest, (seconds, fastest)
    # The MFU it implies: model FLOPs per token (workers.training.flops, one document per row) at that rate.
    from raysft.workers.training.flops import flops_per_token
    from raysft.workers.models.config import ModelConfig

    mfu = float(estimate.split("MFU ")[1].split("%")[0]) / 100
    assert mfu == pytest.approx(tokens * flops_per_token(ModelConfig.from_hf_dict(SMALL), 1024) / 918e12, abs=1e-3)


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


LLAMA_70B = Path(__file__).parents[1] / "benchmarks" / "model_configs" / "Llama-3.1-70B"


@needs_libtpu
def test_arithmetic_refuses_what_cannot_fit_before_compiling():
    """Llama-3.1-70B fully fine-tuned on v5e-8: its fp32 parameters, AdamW state and
    gradients alone are 131 GiB per chip (a count from config.json), against 15.75 GiB.
    Nothing is compiled, for the run nor for any change the search tries."""
    from test_tpu_compile import expected_argument_bytes

    result = plan(SFTConfig(tpu_type="v5litepod-8", max_sequence_length=4096, total_batch_size=8, dtype="bfloat16"),
                  LLAMA_70B, evaluate=False, estimate=False)
    hf = json.loads((LLAMA_70B / "config.json").read_text())
    hf.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    counted = expected_argument_bytes(hf, 8, 8, 4096)
    params = counted // 3  # parameters + 2 AdamW moments (+ counters and the batch, a rounding here)
    assert result.compiled.lower_bound == pytest.approx(counted + params, rel=1e-3)
    assert result.compiled.train.bound_only and result.compiled.train.compile_s == 0
    assert not result.fits and result.fix is None and result.tried
    assert all(total > result.hbm for _, total in result.tried)
    over = (result.compiled.lower_bound - result.hbm) / GiB
    assert result.verdict().startswith(
        f"does not fit: at least {result.total / GiB:.2f} GiB per chip for the parameters, optimizer state and "
        f"gradients alone, {over:.2f} GiB over what a v5e chip has (15.75 GiB)"
    )


@needs_libtpu
def test_unfreeze_schedule_plans_its_last_stage(config_dir):
    """The last stage trains every layer: the plan holds that one's gradients and
    optimizer state, as much as training everything from the start."""
    run = dict(tpu_type="v5p-8", dtype="bfloat16", total_batch_size=8, max_sequence_length=512, scan_layers=False)
    devices = SFTConfig(**run).tpu_slice.compile_devices()

    def compiled(**settings):
        return CompiledRun.compile(plan_spec(SFTConfig(**run, **settings), config_dir), devices, with_eval=False,
                                   with_export=False)

    everything, staged = compiled(), compiled(unfreeze_schedule={"layers": 1, "every_steps": 10})
    assert staged.gradient_bytes == everything.gradient_bytes
    assert staged.optimizer_bytes == pytest.approx(everything.optimizer_bytes, abs=4096)  # a counter per stage
    assert staged.train.total == pytest.approx(everything.train.total, rel=0.02)


@needs_libtpu
def test_v7x_plans_per_tensorcore(config_dir, capsys):
    """Ironwood's two TensorCores are two devices of 96 GiB each (libtpu offers 94.75 GiB)."""
    code = main(["plan", "--repo_id", str(config_dir), "--tpu_type", "v7x-8", "--dtype", "bfloat16",
                 "--total_batch_size", "8", "--max_sequence_length", "1024", "--estimate", "false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "on v7x-8: 4 v7x chips (192 GiB HBM each, as 2 devices of 96 GiB, 94.75 GiB for one program)" in out
    assert "fits: " in out and " GiB of 94.75 GiB per v7x device" in out


def test_chips_offer_no_more_than_they_have():
    for chip in TPU_CHIPS:
        assert chip.usable_hbm_bytes <= chip.device_hbm_bytes, chip.name


@needs_libtpu
def test_an_unknown_chip_skips_the_pre_training_check_with_a_warning(config_dir, tmp_path, capsys, monkeypatch):
    from raysft.workers.runtime import chips

    monkeypatch.setattr(chips, "TPU_CHIPS", tuple(c for c in chips.TPU_CHIPS if c.name != "v6e"))
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}])
    config = SFTConfig(tpu_type="v6e-4", save_directory=str(tmp_path / "runs"))
    rs.SFTTrainer(arguments=config, model=str(config_dir), train_dataset=str(data)).check_fits()
    assert capsys.readouterr().out == (
        "raysft: warning: not checking that the run fits v6e-4 (TPU generation 'v6e' has no memory figures in "
        "raysft; known: v2, v3, v4, v5litepod, v5e, v5p, v7x)\n"
    )


@needs_libtpu
def test_plan_of_a_dpo_run_compiles_the_policy_step_on_paired_rows(config_dir, capsys):
    """`raysft plan --objective dpo`: DPOConfig's flags, rows of 2 x max_length tokens
    holding the reference log-probabilities beside the tokens; no reference model in memory."""
    code = main(["plan", "--objective", "dpo", "--repo_id", str(config_dir), "--tpu_type", "v5p-8", "--dtype", "bfloat16",
                 "--scan_layers", "true", "--total_batch_size", "8", "--max_length", "256", "--beta", "0.2",
                 "--estimate", "false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fits: " in out
    config = rs.DPOConfig(tpu_type="v5p-8", dtype="bfloat16", scan_layers=True, total_batch_size=8, max_length=256)
    assert config.max_sequence_length == 512
    spec = plan_spec(config, config_dir)
    assert spec.preference == {"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                               "reference_free": False}
    sft = plan_spec(SFTConfig(tpu_type="v5p-8", dtype="bfloat16", scan_layers=True, total_batch_size=8,
                              max_sequence_length=512), config_dir)
    devices = config.tpu_slice.compile_devices()
    dpo_run, sft_run = (CompiledRun.compile(s, devices, with_eval=False, with_export=False) for s in (spec, sft))
    # The same parameters, gradients and optimizer state: the reference is rows, not a model.
    assert dpo_run.train.argument == pytest.approx(sft_run.train.argument, rel=0.01)
