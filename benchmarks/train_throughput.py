"""Workload W1: training throughput and MFU of raysft's step against a PyTorch
`transformers` training loop on the same config and the same packed rows, in one run.

W1: Llama, hidden 256, intermediate 768, 4 layers, 8 heads, 4 KV heads, vocab 49,152,
tied embeddings, T = 512, global batch 8 sequences, packing on, fp32, random init,
40 timed steps after 2 untimed ones.

    python benchmarks/train_throughput.py [--steps 40]
"""

from __future__ import annotations

import json
import time

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.data.rows import best_fit_decreasing, build_rows
from raysft.workers.runtime.xla_cpu import run_as_cpu_worker


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="train_throughput.py")

    steps: int = 40
    warmup_steps: int = 2
    batch_size: int = 8
    seq_len: int = 512


W1 = dict(
    vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def packed_batches(s: Settings) -> list[dict[str, np.ndarray]]:
    """Chat-like documents (lognormal lengths, median 150 tokens) packed by global BFD."""
    rng = np.random.default_rng(0)
    rows_needed = (s.steps + s.warmup_steps) * s.batch_size
    lengths = np.clip(rng.lognormal(np.log(150), 0.9, rows_needed * 6).astype(int), 8, s.seq_len)
    docs = [rng.integers(3, W1["vocab_size"], n).astype(np.int32) for n in lengths]
    weights = [np.r_[0.0, np.ones(n - 1)].astype(np.float32) for n in lengths]
    rows = build_rows(docs, weights, best_fit_decreasing(lengths, s.seq_len).first(rows_needed), s.seq_len)
    return [{k: v[i : i + s.batch_size] for k, v in rows.items()} for i in range(0, rows_needed, s.batch_size)]


def bare_step(batches):
    """raysft's jitted train step of W1 on one device, its initial state, and the batches on that device."""
    import jax
    import optax
    from flax import nnx

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.llama import LlamaForCausalLM
    from raysft.workers.models.params import ParamLayout
    from raysft.workers.training.step import make_train_step

    cfg = ModelConfig.from_hf_dict({**W1, "architectures": ["LlamaForCausalLM"]})
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    optimizer = optax.adamw(1e-4)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = make_train_step(layout, optimizer, (device, device))
    return step, params, optimizer.init(params), [jax.device_put(b, device) for b in batches]


def run_raysft(s: Settings, batches) -> float:
    import jax

    step, params, opt_state, on_device = bare_step(batches)
    metrics = None
    for i, batch in enumerate(on_device):
        if i == s.warmup_steps:
            jax.block_until_ready(metrics)
            start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, batch, {}, 0)
    jax.block_until_ready(metrics)  # the only sync in the timed loop, as in training
    return time.perf_counter() - start


def run_pytorch(s: Settings, batches, positions: bool) -> float:
    """`positions`: pass each document's positions (transformers may then build a
    per-document mask); else plain causal attention over the row, SDPA's fastest path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**W1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    prepared = []
    for b in batches:
        ids = torch.from_numpy(b["input_ids"].astype(np.int64))
        labels = ids.masked_fill(torch.from_numpy(b["loss_weights"] == 0), -100)
        prepared.append((ids, torch.from_numpy(b["positions"].astype(np.int64)), labels))
    for i, (ids, position_ids, labels) in enumerate(prepared):
        if i == s.warmup_steps:
            start = time.perf_counter()
        loss = model(input_ids=ids, position_ids=position_ids if positions else None, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax

    from raysft.workers.training.flops import attention_pairs, model_flops, peak_flops
    from raysft.workers.models.config import ModelConfig

    s = Settings()
    batches = packed_batches(s)
    real_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches[s.warmup_steps :])
    pairs = sum(float(attention_pairs(b["segment_ids"])) for b in batches[s.warmup_steps :])
    padding = 1 - real_tokens / (s.steps * s.batch_size * s.seq_len)
    ours_s = run_raysft(s, batches)
    # The faster of PyTorch's two forms is the baseline (see `run_pytorch`).
    torch_forms = {form: run_pytorch(s, batches, positions=form == "with_positions") for form in ("causal", "with_positions")}
    torch_s = min(torch_forms.values())
    cfg = ModelConfig.from_hf_dict({**W1, "architectures": ["LlamaForCausalLM"]})
    peak, source = peak_flops(jax.devices()[0], "float32")
    ours_tps = real_tokens / ours_s
    print(json.dumps({
        "benchmark": "train_throughput W1",
        "device": jax.devices()[0].device_kind,
        "steps": s.steps,
        "padding_fraction": round(padding, 4),
        "raysft_real_tokens_per_s": round(ours_tps, 1),
        "pytorch_real_tokens_per_s": {form: round(real_tokens / t, 1) for form, t in torch_forms.items()},
        "ratio_raysft_over_pytorch": round(torch_s / ours_s, 3),
        "raysft_mfu": round(model_flops(cfg, real_tokens, pairs) / ours_s / peak, 4),
        "mfu_peak": source,
    }, indent=2))


if __name__ == "__main__":
    main()
