"""What a run trains: LoRA adapters on a frozen base and frozen or gradually unfrozen
parameters, through `SFTTrainer` on Ray: checkpoints hold only what trains, resumes
(also where an unfreezing stage starts) continue bit for bit, frozen weights come out as
they went in. A resume is the same run again after its last checkpoint was deleted."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import raysft as rs
from conftest import CORPUS, write_jsonl
from raysft.workers.training.trainable import FreezingError, TrainableSet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", [{"text": CORPUS[i % len(CORPUS)]} for i in range(32)])


def _config(tmp_path, name, **overrides) -> rs.SFTConfig:
    settings = dict(
        model_name=name, save_directory=str(tmp_path / "runs"), max_sequence_length=64, total_batch_size=4,
        num_hosts=1, learning_rate=3e-3, scheduler="none", num_train_epochs=20, log_steps=1, save_steps=2,
    )
    return rs.SFTConfig(**{**settings, **overrides})


def _weights(directory) -> dict[str, np.ndarray]:
    return load_file(str(directory / "model.safetensors"))


def _keep_checkpoints_up_to(directory, step: int) -> None:
    """As if the run had stopped after `step`: its later checkpoints (the final one too) gone."""
    later = [p for p in directory.iterdir() if p.name.isdigit() and int(p.name) > step]
    assert later
    for path in later:
        shutil.rmtree(path)


def _train(config, model_dir, data):
    return rs.SFTTrainer(config, model_dir, train_dataset=data, quiet=True).train()


def test_gradual_unfreezing_freezes_resumes_mid_schedule_and_keeps_frozen_weights(
    local_ray, tmp_path, tiny_model_dir, data, capsys
):
    freezing = dict(frozen_parameters=["embed_tokens", r"layers\.0\.mlp\."], unfreeze_schedule={"layers": 1, "every_steps": 2})
    whole = _train(_config(tmp_path, "whole", max_training_steps=5, **freezing), tiny_model_dir, data)
    # Layer 1 (the top), the final norm and the head train from step 0; layer 0 from step 2.
    assert [r["step"] for r in whole.metrics if r["event"] == "unfreeze"] == [2]
    start = next(r for r in whole.metrics if r["event"] == "start")
    assert start["trainable_parameters"] < next(r for r in whole.metrics if r["event"] == "unfreeze")["trainable_parameters"]
    assert "parameters (" in capsys.readouterr().out  # the startup line: training N of M parameters (x%)

    original, final = _weights(tiny_model_dir), _weights(whole.export_dir)
    frozen = [k for k in original if "embed_tokens" in k or "layers.0.mlp." in k]
    assert frozen and all(np.array_equal(original[k], final[k]) for k in frozen)
    assert not np.array_equal(original["model.layers.0.self_attn.q_proj.weight"], final["model.layers.0.self_attn.q_proj.weight"])
    # Checkpoints hold the trained parameters only (and their optimizer state).
    meta = json.loads((whole.checkpoint_dir / "4" / "meta" / "metadata").read_text())
    assert not any("embed_tokens" in n or "layers.0.mlp." in n for n in meta["trained"])
    assert any(n.startswith("model.layers.0.self_attn") for n in meta["trained"])

    # The checkpoint of step 2 was made before layer 0 was due: without it.
    meta_2 = json.loads((whole.checkpoint_dir / "2" / "meta" / "metadata").read_text())
    assert not any(n.startswith("model.layers.0.") for n in meta_2["trained"])

    # Resumed from step 2, where layer 0 is due: it starts there as in the whole run, and
    # the result is the same to the bit.
    _keep_checkpoints_up_to(whole.checkpoint_dir, 2)
    second = _train(_config(tmp_path, "whole", max_training_steps=5, **freezing), tiny_model_dir, data)
    assert second.summary["start_step"] == 2
    assert [r["step"] for r in second.metrics if r["event"] == "unfreeze"] == [2]
    resumed = _weights(second.export_dir)
    assert all(np.array_equal(final[k], resumed[k]) for k in final)


def test_qlora_run_resumes_bit_identical_and_exports_adapters(local_ray, tmp_path, tiny_model_dir, data):
    """Two hosts, scanned layers, an nf4 base, LoRA dropout and accumulation: the adapters
    (and only they) are checkpointed, a resumed run ends where the whole one does, the
    export is the dequantized base with the adapters merged, and the adapter of any
    checkpoint exports as PEFT reads it."""
    import jax.numpy as jnp

    from raysft.orchestrator.cli import main
    from raysft.workers.models.quantization import Quantization, dequantize, quantize

    lora = dict(
        use_lora=True, lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj", "down_proj"],
        quantize_base="nf4", quantization_block_size=16,
        num_hosts=2, scan_layers=True, gradient_accumulation_steps=2, total_batch_size=8,
    )
    whole = _train(_config(tmp_path, "whole", max_training_steps=4, **lora), tiny_model_dir, data)
    meta = json.loads((whole.checkpoint_dir / "4" / "meta" / "metadata").read_text())
    assert sorted(meta["trained"]) == sorted(
        f"model.layers.{m}.{leaf}" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        for leaf in ("lora_a", "lora_b")
    )
    adapter = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    assert sorted(adapter)[0] == "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" and len(adapter) == 12
    assert json.loads((whole.adapter_dir / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    original, merged = _weights(tiny_model_dir), _weights(whole.export_dir)
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # quantized, not adapted: exported as the run saw it
    nf4 = Quantization("nf4", 16)
    as_trained = np.asarray(dequantize(*quantize(jnp.asarray(original[k_proj].T), nf4), nf4)).T
    np.testing.assert_allclose(merged[k_proj], as_trained, atol=1e-6, rtol=0)
    assert not np.array_equal(merged[k_proj], original[k_proj])
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(merged[q_proj] - original[q_proj]).max() > np.abs(merged[k_proj] - original[k_proj]).max()
    assert np.array_equal(original["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])

    _keep_checkpoints_up_to(whole.checkpoint_dir, 2)
    second = _train(_config(tmp_path, "whole", max_training_steps=4, **lora), tiny_model_dir, data)
    assert second.summary["start_step"] == 2
    resumed = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert all(np.array_equal(adapter[k], resumed[k]) for k in adapter)
    assert [r["loss"] for r in second.metrics if r["event"] == "step"] == [
        r["loss"] for r in whole.metrics if r["event"] == "step"
    ][2:]

    # `raysft export --adapter_only` of the step-2 checkpoint: the adapter at step 2.
    assert main(["export", "--run_dir", str(second.run_dir), "--step", "2", "--adapter_only"]) == 0
    at_2 = load_file(str(second.run_dir / "adapter-step-2" / "adapter_model.safetensors"))
    assert sorted(at_2) == sorted(adapter) and not all(np.array_equal(adapter[k], at_2[k]) for k in adapter)


def test_freezing_settings_that_select_nothing_or_everything_are_refused():
    shapes = {
        "model.embed_tokens.embedding": (10, 4),
        "model.layers.0.mlp.up_proj.kernel": (4, 8),
        "model.layers.1.mlp.up_proj.kernel": (4, 8),
        "model.layers.mlp.down_proj.kernel": (2, 8, 4),  # stacked by scan_layers
        "lm_head.kernel": (4, 10),
    }
    with pytest.raises(FreezingError, match=re.escape(r"frozen_parameters pattern 'mlp\.gate' matches no parameter; names look like")):
        TrainableSet.build(shapes, frozen_patterns=[r"mlp\.gate"])
    with pytest.raises(FreezingError, match="leave no parameter to train"):
        TrainableSet.build(shapes, frozen_patterns=[".*"])
    with pytest.raises(FreezingError, match=r"matches some layers of model.layers.mlp.down_proj.kernel"):
        TrainableSet.build(shapes, frozen_patterns=[r"layers\.0\.mlp\.down_proj"])
    only_head = TrainableSet.build(shapes, trainable_patterns=["lm_head"])
    assert only_head.names_at(100) == ["lm_head.kernel"] and only_head.trainable_count(0) == 40
    with pytest.raises(FreezingError, match="scan_layers"):
        TrainableSet.build(shapes, unfreeze_layers=1, unfreeze_every_steps=5, num_layers=2)
    unscanned = {k: v for k, v in shapes.items() if k != "model.layers.mlp.down_proj.kernel"}
    staged = TrainableSet.build(unscanned, unfreeze_layers=1, unfreeze_every_steps=5, num_layers=2)
    assert staged.stages == (
        (0, ("model.embed_tokens.embedding", "model.layers.1.mlp.up_proj.kernel", "lm_head.kernel")),
        (5, ("model.layers.0.mlp.up_proj.kernel",)),
    )
    assert [staged.stage_at(s) for s in (0, 4, 5, 99)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="set every_steps or every_epochs"):
        rs.SFTConfig(unfreeze_schedule={"layers": 1})
    with pytest.raises(ValueError, match="scan_layers"):
        rs.SFTConfig(unfreeze_schedule={"layers": 1, "every_epochs": 1}, scan_layers=True)


def test_bad_lora_and_freezing_settings_stop_before_ray(tmp_path, tiny_model_dir, data):
    for overrides, message in [
        ({"use_lora": True, "lora_target_modules": ["query_key_value"]}, "matches none of the model's projections"),
        ({"use_lora": True, "lora_rank": 64}, r"lora_rank 64 is larger than the smallest adapted dimension \(16\)"),
        ({"frozen_parameters": ["no_such_weight"]}, "pattern 'no_such_weight' matches no parameter"),
        ({"use_lora": True, "lora_init_from": str(tmp_path)}, "adapter_config.json not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            rs.SFTTrainer(_config(tmp_path, "bad", **overrides), tiny_model_dir, train_dataset=data)
