"""DPO training-step throughput against TRL's `DPOTrainer` on the same W1-sized Llama and pairs.

Both have the reference's log-probabilities precomputed (TRL's `precompute_ref_log_probs`,
raysft's always), so a step is the policy's forward and backward on the chosen and rejected
sequences and an AdamW update. raysft packs a pair's two sequences into one row; TRL pads
them as two. Also raysft's SFT step on the same rows, the cost of the sequence
log-probabilities over the fused cross-entropy. Measured in one run and printed as ratios:

    python benchmarks/dpo_step.py                 # 4 pairs, prompt 128 + completions 128
    python benchmarks/dpo_step.py --pairs 8 --steps 10
"""

from __future__ import annotations

import json

from pydantic_settings import SettingsConfigDict

from model_step import Settings as ModelSettings
from model_step import hf_config, time_steps
from raysft.workers.runtime.xla_cpu import run_as_cpu_worker


class Settings(ModelSettings):
    """model_step's W1-sized Llama, on pairs instead of rows."""

    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="dpo_step.py")

    pairs: int = 4
    prompt_len: int = 128
    completion_len: int = 128


def _pairs(s: Settings):
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, s.vocab_size, (s.pairs, s.prompt_len))
    # Completions end with EOS (id 2), as TRL's do once it appends the tokenizer's.
    chosen, rejected = (np.c_[rng.integers(3, s.vocab_size, (s.pairs, s.completion_len - 1)), np.full(s.pairs, 2)]
                        for _ in range(2))
    return prompts, chosen, rejected


def _hf_config(s: Settings):
    """model_step's Llama for rows of one sequence, with the ids TRL's tokenizer below uses."""
    config = hf_config(s.model_copy(update={"seq_len": s.prompt_len + s.completion_len}))
    config.pad_token_id, config.eos_token_id = 0, 2
    return config


def ours(s: Settings, prompts, chosen, rejected, objective_name: str = "dpo") -> float:
    """Seconds per raysft step of the DPO objective (or, `objective_name` "sft", of SFT's
    fused cross-entropy on the same rows: what the sequence log-probabilities cost)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.llama import LlamaForCausalLM
    from raysft.workers.models.params import ParamLayout
    from raysft.workers.models.runtime import ModelRuntime
    from raysft.workers.training.objective import SFT
    from raysft.workers.training.preference import REFERENCE_FIELD, Preference, PreferenceSettings
    from raysft.workers.training.step import make_train_step

    cfg = ModelConfig.from_hf_dict(_hf_config(s).to_dict() | {"architectures": ["LlamaForCausalLM"]})
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, runtime=ModelRuntime(), rngs=nnx.Rngs(0)))
    length = s.prompt_len + s.completion_len
    ids = np.concatenate([prompts, chosen, prompts, rejected], axis=1)  # one pair per row: chosen, then rejected
    segment = np.repeat([1, 2], length)
    weights = np.tile(np.r_[np.zeros(s.prompt_len), np.ones(s.completion_len)], 2)
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "segment_ids": jnp.asarray(np.broadcast_to(segment, ids.shape), jnp.int32),
        "positions": jnp.asarray(np.broadcast_to(np.tile(np.arange(length), 2), ids.shape), jnp.int32),
        "loss_weights": jnp.asarray(np.broadcast_to(weights, ids.shape), jnp.float32),
        REFERENCE_FIELD: jnp.asarray(-np.ones(ids.shape) * np.broadcast_to(weights, ids.shape), jnp.float32),
    }
    optimizer = optax.adamw(1e-6)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    objective = Preference(PreferenceSettings("sigmoid", 0.1), s.loss_chunk_size)
    if objective_name == "sft":
        objective = SFT(s.loss_chunk_size)
        del batch[REFERENCE_FIELD]
    train_step = make_train_step(layout, optimizer, (device, device), objective=objective)
    state = {"params": params, "opt": optimizer.init(params)}

    def step():
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], batch, {}, 0)
        jax.block_until_ready(metrics["loss"])

    return time_steps(step, s.warmup_steps, s.steps)


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's ids (TRL's trainer needs one; the batch below is already ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def trl(s: Settings, prompts, chosen, rejected, out_dir: str) -> float:
    import datasets
    import torch
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(_hf_config(s))
    args = DPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, beta=0.1, max_length=None,
                     per_device_train_batch_size=s.pairs, precompute_ref_log_probs=True)
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    rows = [{"prompt": words(p), "chosen": " " + words(c[:-1]), "rejected": " " + words(r[:-1])}
            for p, c, r in zip(prompts, chosen, rejected)]
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=_tokenizer(s.vocab_size))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(s.pairs)])
    # The same sequences as ours: prompt, completion and the EOS TRL appends.
    assert batch["input_ids"].shape == (2 * s.pairs, s.prompt_len + s.completion_len), batch["input_ids"].shape
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, s.warmup_steps, s.steps)


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import tempfile

    import jax

    s = Settings()
    prompts, chosen, rejected = _pairs(s)
    ours_s = ours(s, prompts, chosen, rejected)
    sft_s = ours(s, prompts, chosen, rejected, "sft")
    with tempfile.TemporaryDirectory() as out_dir:
        trl_s = trl(s, prompts, chosen, rejected, out_dir)
    tokens = 2 * s.pairs * (s.prompt_len + s.completion_len)
    print(json.dumps({
        "benchmark": "dpo_step",
        "device": jax.devices()[0].device_kind,
        "config": s.model_dump(),
        "raysft_step_s": round(ours_s, 4),
        "trl_step_s": round(trl_s, 4),
        "raysft_tokens_per_s": round(tokens / ours_s, 1),
        "trl_tokens_per_s": round(tokens / trl_s, 1),
        "ratio_raysft_over_trl": round(trl_s / ours_s, 3),
        "raysft_sft_step_s": round(sft_s, 4),  # the same rows under the SFT objective
        "ratio_dpo_over_sft_step": round(sft_s / ours_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
