"""Model FLOPs per token and the peak FLOP/s of a device, for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from raysft.workers.chips import chip_of_device
from raysft.workers.models.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (the LM head included, the
    embedding lookup not) plus causal attention's scores and weighted sum (PaLM's
    12·L·H·K·T, halved for causality)."""
    d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, g = cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = d * h * k + 2 * d * g * k + h * k * d + 3 * d * f
    matmul_params = cfg.num_hidden_layers * per_layer + d * cfg.vocab_size
    attention = 12 * cfg.num_hidden_layers * h * k * seq_len / 2
    return 6 * matmul_params + attention


@functools.lru_cache(maxsize=1)
def _cpu_probe() -> float:
    """Achieved fp32 matmul FLOP/s of this host's CPU devices, measured once."""
    n = 1024
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        matmul(x).block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - start)


def peak_flops(device) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    chip = chip_of_device(device)
    if chip is not None:
        return chip.peak_flops, f"{chip.name} bf16 peak"
    if device.platform == "cpu":
        return _cpu_probe(), "cpu matmul probe (achieved, not peak)"
    return float("nan"), f"unknown device {device.device_kind}"
