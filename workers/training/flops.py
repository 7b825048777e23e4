"""Model FLOPs and the peak FLOP/s of the mesh they run on, for MFU.

Model FLOPs are counted as MaxText and PaLM count them: 6 x the matmul parameters per
token (the LM head included, the embedding lookup not; of a mixture of experts, the
experts a token is routed to), plus attention's scores and
weighted sum for the (query, key) pairs a causal document has, 12 x layers x heads x
head_dim per pair (forward and backward). A packed row of documents of lengths n_i has
sum n_i (n_i + 1) / 2 pairs, not T^2 / 2: the attention a document never computes
against its neighbours is not counted, nor, in a sliding-window layer (Mistral, Gemma),
the keys beyond its window. Pairs are averaged over the layers, so the per-pair factor
stays the model's.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np

from raysft.workers.models.config import ModelConfig
from raysft.workers.runtime.chips import chip_of_device


def matmul_flops_per_token(cfg: ModelConfig) -> float:
    """A mixture of experts counts the parameters a token uses: its router and its
    `num_experts_per_tok` experts, not every expert."""
    d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, g = cfg.num_attention_heads, cfg.num_key_value_heads
    attention = d * h * k + 2 * d * g * k + h * k * d
    sparse = cfg.sparse_per_layer.count(True)
    mlp = (cfg.num_hidden_layers - sparse) * 3 * d * f
    experts = sparse * (d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size)
    return 6 * (cfg.num_hidden_layers * attention + mlp + experts + d * cfg.vocab_size)


def attention_flops_per_pair(cfg: ModelConfig) -> float:
    return 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of rows that are each one document of `seq_len` tokens
    (T (T + 1) / 2 pairs per T tokens, fewer under a window): the estimate for a run not
    yet measured."""
    keys = np.arange(1, seq_len + 1)
    pairs = np.mean([np.minimum(keys, w or seq_len).sum() for w in cfg.window_per_layer or (None,)])
    return matmul_flops_per_token(cfg) + attention_flops_per_pair(cfg) * pairs / seq_len


def attention_pairs(segment_ids_BxT: jax.Array, windows=(None,)) -> jax.Array:
    """The causal (query, key) pairs of the documents in the rows, averaged over layers of
    `windows` (one per layer; None: no window): each real token attends to itself and the
    tokens before it in its segment (segments are contiguous), at most `window` of them."""
    t = segment_ids_BxT.shape[-1]
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BxT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    keys_BxT = jnp.where(segment_ids_BxT > 0, index - segment_start + 1, 0)
    windows = tuple(windows) or (None,)  # a model of no layers (a plan's cost probe) counts as causal
    layers = {w: windows.count(w) for w in windows}  # each distinct window counted once
    total = sum(n * jnp.sum(jnp.minimum(keys_BxT, w or t).astype(jnp.float32)) for w, n in layers.items())
    return total / len(windows)


def model_flops(cfg: ModelConfig, tokens: float, pairs: float) -> float:
    return matmul_flops_per_token(cfg) * tokens + attention_flops_per_pair(cfg) * pairs


@functools.lru_cache(maxsize=1)
def _cpu_probe(repeats: int = 7) -> float:
    """Achieved fp32 matmul FLOP/s of this machine's CPU, all its cores on one matmul: the
    best of `repeats` timings, since whatever else runs (another worker starting, a
    shared machine's neighbours) only ever slows a timing down (one timing of 50 ms
    varied 2x between runs)."""
    n = 1024
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 5 * 2 * n**3 / best


def peak_flops(device, compute_dtype="bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one accelerator device at the compute dtype, or of this whole
    machine for a CPU device, where the figure comes from)."""
    chip = chip_of_device(device)
    if chip is not None:
        if np.dtype(compute_dtype) == np.float32 and chip.fp32_peak_flops:
            return chip.fp32_peak_flops / chip.devices_per_chip, f"{chip.name} fp32 (TF32) peak"
        return chip.peak_flops / chip.devices_per_chip, f"{chip.name} bf16 peak"
    if device.platform == "cpu":
        return _cpu_probe(), "cpu matmul probe, all cores (achieved, not peak)"
    return float("nan"), f"unknown device {device.device_kind}"


def mesh_peak_flops(devices, compute_dtype="bfloat16") -> tuple[float, str]:
    """Peak FLOP/s of the whole mesh: per device for accelerators; for CPUs, per machine,
    however many virtual devices and processes share it (process 0 probes its machine
    while the others wait, so no probe competes with another for the cores)."""
    device = devices[0]
    if device.platform != "cpu":
        peak, source = peak_flops(device, compute_dtype)
        return peak * len(devices), source
    from jax.experimental import multihost_utils

    probe = _cpu_probe() if jax.process_index() == 0 else 0.0
    machine = int.from_bytes(hashlib.blake2b(socket.gethostname().encode(), digest_size=4).digest(), "little")
    gathered = np.asarray(multihost_utils.process_allgather(np.array([probe, machine], np.float64)))
    machines = len(np.unique(gathered.reshape(-1, 2)[:, 1]))
    return float(gathered.reshape(-1, 2)[0, 0]) * machines, f"cpu matmul probe x {machines} machine(s) (achieved, not peak)"
