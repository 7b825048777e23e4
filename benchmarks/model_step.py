"""Training-step throughput of our model against a PyTorch `transformers` training step.

Same architecture, same batch, AdamW in fp32, on this machine, measured in one run and
printed as a ratio (timings on shared machines are noisy; the ratio is what to compare):

    python benchmarks/model_step.py                  # W1-sized Llama, batch 4 x 512
    python benchmarks/model_step.py --steps 10 --attn_mechanism dot_product
"""

from __future__ import annotations

import json
import time

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="model_step.py")

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    vocab_size: int = 49152
    seq_len: int = 512
    batch_size: int = 4
    warmup_steps: int = 2
    steps: int = 5
    attn_mechanism: str = "auto"
    gradient_checkpointing: str = "none"
    scan_layers: bool = False
    loss_chunk_size: int | None = 1024


def hf_config(s: Settings):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, tie_word_embeddings=True, max_position_embeddings=s.seq_len,
    )


def time_steps(step, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` untimed steps (compilation, allocator warm-up)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def ours(s: Settings, input_ids) -> float:
    from flax import nnx

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.llama import LlamaForCausalLM
    from raysft.workers.models.params import ParamLayout
    from raysft.workers.models.runtime import ModelRuntime

    cfg = ModelConfig.from_hf_dict(hf_config(s).to_dict() | {"architectures": ["LlamaForCausalLM"]})
    runtime = ModelRuntime(s.attn_mechanism, s.gradient_checkpointing, s.scan_layers)
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, runtime=runtime, rngs=nnx.Rngs(0)))
    return time_jax_training(layout, params, input_ids, s.warmup_steps, s.steps, loss_chunk_size=s.loss_chunk_size)


def time_jax_training(layout, params, input_ids, warmup: int, steps: int, **step_settings) -> float:
    """Seconds per raysft train step (AdamW) of the model `layout` on rows `input_ids`."""
    import jax
    import jax.numpy as jnp
    import optax

    from raysft.workers.training.step import make_train_step

    optimizer = optax.adamw(1e-4)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    train_step = make_train_step(layout, optimizer, (device, device), **step_settings)
    ids = jnp.asarray(input_ids, jnp.int32)
    batch = {
        "input_ids": ids,
        "segment_ids": jnp.ones_like(ids),
        "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
        "loss_weights": jnp.ones(ids.shape, jnp.float32),
    }
    state = {"params": params, "opt": optimizer.init(params)}

    def step():
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], batch, {}, 0)
        jax.block_until_ready(metrics["loss"])

    return time_steps(step, warmup, steps)


def time_torch_training(model, input_ids, warmup: int, steps: int, **forward) -> float:
    """Seconds per PyTorch training step (AdamW) of `model` on rows `input_ids`."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.from_numpy(input_ids)

    def step():
        loss = model(input_ids=ids, labels=ids, **forward).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps)


def pytorch(s: Settings, input_ids) -> float:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return time_torch_training(LlamaForCausalLM(hf_config(s)), input_ids, s.warmup_steps, s.steps)


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax
    import numpy as np

    s = Settings()
    input_ids = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch_size, s.seq_len)).astype(np.int64)
    tokens = s.batch_size * s.seq_len
    ours_s = ours(s, input_ids)
    torch_s = pytorch(s, input_ids)
    result = {
        "benchmark": "model_step",
        "device": jax.devices()[0].device_kind,
        "config": s.model_dump(),
        "raysft_tokens_per_s": round(tokens / ours_s, 1),
        "pytorch_tokens_per_s": round(tokens / torch_s, 1),
        "ratio_raysft_over_pytorch": round(torch_s / ours_s, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
