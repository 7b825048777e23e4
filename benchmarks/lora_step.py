"""LoRA against full fine-tuning on W1 (see train_throughput.py): optimizer state and the
jitted step's time, both steps built by `RunPrograms`' own path (the trained parameters
differentiated, the frozen base passed in), measured alternately in one run.

LoRA: r = 16 on every linear projection of the decoder (PEFT's "all-linear"), AdamW.

    python benchmarks/lora_step.py [--steps 20]
"""

from __future__ import annotations

import json
import time

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

from train_throughput import W1, packed_batches


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="lora_step.py")

    steps: int = 20
    warmup_steps: int = 2
    batch_size: int = 8
    seq_len: int = 512
    rounds: int = 3  # full and LoRA alternate, each timed `rounds` times


def build(lora: bool):
    """(step, trained params, optimizer state, frozen params) on one CPU device."""
    import jax
    import optax
    from flax import nnx

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.llama import LlamaForCausalLM
    from raysft.workers.models.lora import LAYER_MODULES, LoraSettings, is_adapter
    from raysft.workers.models.params import ParamLayout
    from raysft.workers.training.step import make_train_step

    cfg = ModelConfig.from_hf_dict({**W1, "architectures": ["LlamaForCausalLM"]})
    settings = LoraSettings(16, 32.0, 0.0, LAYER_MODULES) if lora else None
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, lora=settings, rngs=nnx.Rngs(0)))
    trained = {n: p for n, p in params.items() if is_adapter(n) or not lora}
    frozen = {n: p for n, p in params.items() if n not in trained}
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(trained)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = make_train_step(layout, optimizer, (device, device), frozen_sharding=device)
    return step, trained, opt_state, frozen


def nbytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def timed(state, batches, s: Settings) -> float:
    import jax

    step, trained, opt_state, frozen = state
    metrics = None
    for i, batch in enumerate(batches[: s.warmup_steps + s.steps]):
        if i == s.warmup_steps:
            jax.block_until_ready(metrics)
            start = time.perf_counter()
        trained, opt_state, metrics = step(trained, opt_state, batch, frozen, np.int32(i))
    jax.block_until_ready(metrics)
    state[1], state[2] = trained, opt_state
    return (time.perf_counter() - start) / s.steps


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax

    s = Settings()
    batches = [jax.device_put(b) for b in packed_batches(s)]
    states = {"full": list(build(lora=False)), "lora": list(build(lora=True))}
    optimizer_bytes = {name: nbytes(state[2]) for name, state in states.items()}
    seconds = {name: [] for name in states}
    for _ in range(s.rounds):
        for name, state in states.items():
            seconds[name].append(timed(state, batches, s))
    best = {name: min(times) for name, times in seconds.items()}
    result = {
        "benchmark": "lora_step",
        "full_step_s": round(best["full"], 4),
        "lora_step_s": round(best["lora"], 4),
        "lora_step_speedup": round(best["full"] / best["lora"], 3),  # target: >= 1.0
        "full_optimizer_mib": round(optimizer_bytes["full"] / 2**20, 2),
        "lora_optimizer_mib": round(optimizer_bytes["lora"] / 2**20, 2),
        "optimizer_state_ratio": round(optimizer_bytes["full"] / optimizer_bytes["lora"], 1),  # target: >= 3
        "trained_parameters": {name: int(sum(np.prod(p.shape) for p in state[1].values())) for name, state in states.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
