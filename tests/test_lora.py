"""LoRA against PEFT (the reference): adapted logits, PEFT adapter files both ways, the
merged export read by transformers, and whole training runs step for step against TRL's
SFTTrainer with a PEFT model."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import raysft as rs
from conftest import save_tiny_gemma3_multimodal, save_tiny_model, write_jsonl
from raysft.workers.models.auto import build_layout
from raysft.workers.models.config import ModelConfig, ModelLoadError, read_hf_config
from raysft.workers.models.export import save_pretrained
from raysft.workers.models.loading import load_params
from raysft.workers.models.lora import LoraSettings, check_rank, is_adapter, resolve_modules
from raysft.workers.models.peft import read_adapter, save_adapter
from raysft.workers.models.runtime import ModelRuntime
from raysft.workers.generation.sampler import Sampler, SamplingParams

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _peft_model(model_dir, targets, rank=4, alpha=8.0, seed=0):
    """A PEFT model with random (non-zero) adapters on the base in `model_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, config).eval()


def _ours(model_dir, lora: LoraSettings, adapter_dir, scan_layers=False):
    """(layout, params): our model with the PEFT adapter in `adapter_dir`."""
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    layout = build_layout(cfg, jnp.float32, jnp.float32, ModelRuntime(scan_layers=scan_layers), lora)
    base = dataclasses.replace(layout, shapes={n: s for n, s in layout.shapes.items() if not is_adapter(n)})
    params, _ = load_params(model_dir, base, lambda name, shape: DEVICE)
    adapters = {n: s for n, s in layout.shapes.items() if is_adapter(n)}
    params.update(read_adapter(str(adapter_dir), lora, cfg, adapters, lambda name, shape: DEVICE))
    return cfg, layout, params


VARIANTS = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-bias-window": ("qwen3", {"attention_bias": True, "use_sliding_window": True, "sliding_window": 5,
                                    "max_window_layers": 0}),
    "gemma2-capped": ("gemma2", {"sliding_window": 6, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    "phi3-fused": ("phi3", {}),
}


@pytest.mark.parametrize(
    "variant, scan_layers",
    [("llama", False), ("llama", True), ("mistral-window", True), ("qwen2-bias-tied", False), ("qwen3-bias-window", True),
     ("gemma2-capped", True), ("phi3-fused", True)],  # Gemma 3: the multimodal test below
)
def test_adapted_model_matches_peft_and_round_trips(tmp_path, variant, scan_layers):
    """Logits of our adapted model equal PEFT's, and its greedy answers PEFT's `generate`;
    the adapter we write loads in PEFT with the same logits; the merged export loads in
    transformers with the same logits. Phi-3's PEFT adapters are on its fused modules
    (`qkv_proj`, `gate_up_proj`): read into raysft's split projections and written back
    fused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    architecture, overrides = VARIANTS[variant]
    model_dir = save_tiny_model(tmp_path / "base", vocab_size=97, architecture=architecture, **overrides)
    targets = ["q_proj", "v_proj", "down_proj"] if architecture == "llama" else "all-linear"
    reference = _peft_model(model_dir, targets)
    reference.save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 24))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()

    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    lora = LoraSettings(4, 8.0, 0.0, resolve_modules(targets, cfg))
    _, layout, params = _ours(model_dir, lora, tmp_path / "peft", scan_layers)
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # The KV-cache sampler goes through the adapters too: PEFT's greedy tokens.
    prompts = [ids[0, :n].tolist() for n in (5, 11)]
    answers = Sampler(layout, stop_token_ids=[], max_length=64).generate(params, prompts, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            greedy = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                        eos_token_id=None, pad_token_id=0)
            assert answer == greedy[0, len(prompt):].tolist()

    from etils import epath

    save_adapter({n: p for n, p in params.items() if is_adapter(n)}, lora, epath.Path(tmp_path / "ours"), str(model_dir), cfg)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)

    save_pretrained(params, read_hf_config(model_dir / "config.json"), epath.Path(tmp_path / "merged"),
                    lora_scale=lora.scale)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)


def test_multimodal_gemma3_adapts_and_exports_its_language_model(tmp_path):
    """A Gemma 3 4B-style checkpoint (vision tower beside the language model): raysft
    reads the language model with the multimodal model's text logits, takes a PEFT
    adapter made on the multimodal model and writes one PEFT loads back onto it (its
    pattern leaves the vision tower's projections alone), and exports the text-only
    Gemma3ForCausalLM."""
    from etils import epath
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    model_dir = save_tiny_gemma3_multimodal(tmp_path / "base")
    load = lambda: Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(0)
    targets = r".*language_model.*\.(q_proj|v_proj|down_proj)"
    reference = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, init_lora_weights=False))
    reference.eval().save_pretrained(tmp_path / "peft")
    ids = np.random.default_rng(0).integers(0, 90, size=(2, 24))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(ids)).logits.numpy()

    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    lora = LoraSettings(4, 8.0, 0.0, resolve_modules(targets, cfg))
    assert lora.modules == ("q_proj", "v_proj", "down_proj")
    _, layout, params = _ours(model_dir, lora, tmp_path / "peft", scan_layers=True)
    ours = np.asarray(layout.bind(params)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    save_adapter({n: p for n, p in params.items() if is_adapter(n)}, lora, epath.Path(tmp_path / "ours"), str(model_dir), cfg)
    reloaded = PeftModel.from_pretrained(load(), tmp_path / "ours").eval()
    adapted = [n for n, _ in reloaded.named_modules() if n.endswith("lora_A")]
    assert adapted and all("language_model" in n for n in adapted)
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(input_ids=torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)

    save_pretrained(params, read_hf_config(model_dir / "config.json"), epath.Path(tmp_path / "merged"),
                    lora_scale=lora.scale)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_holds_base_parameters_trained_beside_it(tmp_path, tied):
    """LoRA with `trainable_parameters: [embed_tokens, a norm]`: the adapter saves them
    whole (PEFT's modules_to_save, tied to the head where the model ties them), and the
    model peft loads from it has the merged export's logits."""
    from etils import epath
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "base", vocab_size=97, tie_word_embeddings=tied)
    targets = ["q_proj", "v_proj"]
    _peft_model(model_dir, targets).save_pretrained(tmp_path / "peft")
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    lora = LoraSettings(4, 8.0, 0.0, resolve_modules(targets, cfg))
    _, layout, params = _ours(model_dir, lora, tmp_path / "peft")
    rng = np.random.default_rng(1)
    trained = [n for n in layout.shapes if "embed" in n or ("layers.1" in n and "post_attention_layernorm" in n)]
    assert len(trained) == 2, list(layout.shapes)
    for name in trained:  # as training would have changed them
        params[name] = params[name] + jnp.asarray(rng.normal(0, 0.5, params[name].shape), params[name].dtype)

    save_adapter({n: p for n, p in params.items() if is_adapter(n)}, lora, epath.Path(tmp_path / "ours"),
                 str(model_dir), cfg, {n: params[n] for n in trained})
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens", "model.layers.1.post_attention_layernorm"]
    save_pretrained(params, read_hf_config(model_dir / "config.json"), epath.Path(tmp_path / "merged"),
                    lora_scale=lora.scale)
    ids = torch.from_numpy(rng.integers(0, 97, size=(2, 24)))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, tmp_path / "ours").eval()(ids).logits.numpy()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(ids).logits.numpy()
        untrained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits.numpy()
    np.testing.assert_allclose(adapted, merged, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(layout.bind(params)(jnp.asarray(ids.numpy()))), merged, atol=1e-4, rtol=0)
    assert np.abs(merged - untrained).max() > 0.1  # the trained embedding and norm changed the model

    # A kernel that also has an adapter cannot be saved whole next to it: one line, no adapter.
    kernel = next(n for n in layout.shapes if "q_proj" in n and not is_adapter(n))
    with pytest.raises(ValueError, match=r"cannot hold model\.layers\.0\.self_attn\.q_proj\.weight: .* merged model"):
        save_adapter({}, lora, epath.Path(tmp_path / "refused"), str(model_dir), cfg, {kernel: params[kernel]})
    # ... and a run that would train it so stops before training.
    from raysft.orchestrator.plan import plan_spec
    from raysft.workers.training.trainable import FreezingError, check_run

    config = rs.SFTConfig(use_lora=True, lora_target_modules=targets, trainable_parameters=["q_proj"])
    with pytest.raises(FreezingError, match=r"cannot hold .*q_proj.*: train it whole .* or adapt it"):
        check_run(plan_spec(config, model_dir), model_dir)


def test_target_modules_as_peft_reads_them(tmp_path):
    model_dir = save_tiny_model(tmp_path, vocab_size=97)
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    everything = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert resolve_modules("all-linear", cfg) == everything
    assert resolve_modules(["v_proj", "q_proj"], cfg) == ("q_proj", "v_proj")
    assert resolve_modules(r".*\.(q|v)_proj", cfg) == ("q_proj", "v_proj")
    assert resolve_modules(["lm_head", "self_attn.o_proj"], cfg) == ("o_proj", "lm_head")
    with pytest.raises(ValueError, match=r"matches none of the model's projections; it can name q_proj, k_proj, .*lm_head"):
        resolve_modules(["query_key_value"], cfg)
    with pytest.raises(ValueError, match=r"adapts q_proj in layers \[0\] only"):
        resolve_modules(r"model\.layers\.0\.self_attn\.q_proj", cfg)
    with pytest.raises(ValueError, match="lora_rank 40 is larger than the smallest adapted dimension \\(32\\)"):
        check_rank(40, cfg, ("q_proj",))
    tied = ModelConfig.from_hf_dict({**read_hf_config(model_dir / "config.json"), "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="matches none"):
        resolve_modules(["lm_head"], tied)  # tied embeddings: there is no separate output projection


def test_adapter_of_another_shape_or_rank_is_refused(tmp_path):
    model_dir = save_tiny_model(tmp_path / "base", vocab_size=97)
    _peft_model(model_dir, ["q_proj", "v_proj"]).save_pretrained(tmp_path / "peft")
    for lora, message in [
        (LoraSettings(8, 8.0, 0.0, ("q_proj", "v_proj")), "rank r=4, this run's lora_rank is 8"),
        (LoraSettings(4, 16.0, 0.0, ("q_proj", "v_proj")), "lora_alpha 8.0, this run's lora_alpha is 16.0"),
        (LoraSettings(4, 8.0, 0.0, ("q_proj",)), r"target modules \['q_proj', 'v_proj'\], this run's"),
    ]:
        with pytest.raises(ModelLoadError, match=message):
            _ours(model_dir, lora, tmp_path / "peft")
    # The same adapter names on a wider model: the first tensor of another shape is named.
    wide = save_tiny_model(tmp_path / "wide", vocab_size=97, hidden_size=48)
    with pytest.raises(ModelLoadError, match=r"q_proj.lora_A.weight has shape \(4, 32\), this model's adapter needs \(4, 48\)"):
        _ours(wide, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj")), tmp_path / "peft")


def test_lora_settings_are_checked_in_the_config():
    with pytest.raises(ValueError, match="lora_rank set but use_lora is false"):
        rs.SFTConfig(lora_rank=8)
    with pytest.raises(ValueError, match="greater than 0"):
        rs.SFTConfig(use_lora=True, lora_rank=0)
    assert rs.SFTConfig(use_lora=True, lora_init_from="adapter").lora_init_from.startswith("/")


# Four pre-tokenized rows of different lengths: one full batch, every token trained.
ROWS = [[1, 5, 9, 14, 22, 31, 40, 41, 17, 2], [1, 7, 7, 3, 60, 61, 2], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 2],
        [1, 12, 13, 2]]


def _peft_losses(model_dir, adapter_dir, steps: int, out_dir) -> dict[str, list[float]]:
    """Per-step losses of full-batch AdamW steps at a constant lr on a PEFT model, by a plain
    PyTorch loop (TRL's SFT objective: the mean token loss over every trained token of the
    batch) and by TRL's SFTTrainer, both from the initial adapter saved to `adapter_dir`."""
    import datasets
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(adapter_dir)  # raysft starts from this same adapter

    def initial():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)

    model = initial().train()
    width = max(map(len, ROWS))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in ROWS])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ROWS])
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loop = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loop.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    trl = []

    class Recording(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            trl.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=len(ROWS), max_steps=steps, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        report_to=[], save_strategy="no", max_length=32, packing=False, use_cpu=True, seed=0,
        bf16=False,  # TRL's default is bf16 autocast, 1e-4 off fp32 at the first step
    )
    Recording(
        model=initial(), args=args, train_dataset=datasets.Dataset.from_list([{"input_ids": r} for r in ROWS]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    ).train()
    return {"loop": loop, "trl": trl}


def test_lora_training_matches_trl_with_peft_step_for_step(local_ray, tmp_path, tiny_model_dir):
    steps = 4
    reference = _peft_losses(tiny_model_dir, tmp_path / "initial_adapter", steps, tmp_path / "trl")
    config = rs.SFTConfig(
        model_name="lora", save_directory=str(tmp_path / "runs"), dataset_format="tokenized", max_sequence_length=32,
        total_batch_size=len(ROWS), max_training_steps=steps, num_train_epochs=steps, learning_rate=1e-2,
        scheduler="none", weight_decay=0.0, clip_grad=None, log_steps=1, num_hosts=1,
        use_lora=True, lora_rank=4, lora_alpha=8, lora_target_modules="all-linear",
        lora_init_from=str(tmp_path / "initial_adapter"),
    )
    data = write_jsonl(tmp_path / "rows.jsonl", [{"input_ids": r} for r in ROWS])
    out = rs.SFTTrainer(config, tiny_model_dir, train_dataset=data, quiet=True).train()
    losses = [r["loss"] for r in out.metrics if r["event"] == "step"]
    assert len(losses) == len(reference["loop"]) == len(reference["trl"]) == steps
    np.testing.assert_allclose(losses, reference["loop"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(losses, reference["trl"], atol=2e-5, rtol=0)
    assert losses[-1] < losses[0] - 0.05  # it trained: lr 1e-2 moves a tiny model's loss

    # The checkpoint holds the adapters and their optimizer state, not the base.
    step_dir = out.checkpoint_dir / str(steps)
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert meta["trained"] and all(name.endswith((".lora_a", ".lora_b")) for name in meta["trained"])
    # 2 layers x 7 projections x (A, B)
    assert len(meta["trained"]) == 28
    summary = out.summary
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] / 5
