"""W1's attention alone, forward and backward, against PyTorch's CPU
`scaled_dot_product_attention` (a fused flash kernel) in the same run.

W1's shapes: batch 8 rows of 512 positions, 8 query heads sharing 4 KV heads of 32, fp32;
each row packs several documents (`train_throughput.packed_batches`' rows). raysft's CPU
kernel (`attn_mechanism: auto` on CPU: `blocked`) attends within each document; PyTorch
runs in two forms, causal over the whole row (its flash kernel, no mask; the documents
see each other, so it is less work than raysft's only by that mask) and with the
per-document boolean mask (the same result as raysft's); the faster is the baseline. Each
side runs its steps in turn with the other, `--rounds` times; the best round of each
counts.

    python benchmarks/attention.py [--rounds 7] [--worker_tunables false]

`--worker_tunables false` runs without the CPU workers' glibc tunables (huge pages for
large allocations), to show what they do here.
"""

from __future__ import annotations

import json
import time

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker, use_cpu_xla_flags

from train_throughput import W1, Settings as BareSettings, packed_batches


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="attention.py")

    rounds: int = 7
    worker_tunables: bool = True


def best_seconds(fns: dict, rounds: int) -> dict[str, float]:
    """Each function run once per round, in turn with the others; the best round of each."""
    for fn in fns.values():
        fn()  # compilation, allocator warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    s = Settings()
    run_as_cpu_worker() if s.worker_tunables else use_cpu_xla_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from raysft.workers.models.attention import IMPLEMENTATIONS, resolve_mechanism

    segments = packed_batches(BareSettings(steps=1, warmup_steps=0, _cli_parse_args=False))[0]["segment_ids"]
    b, t = segments.shape
    h, g, k = W1["num_attention_heads"], W1["num_key_value_heads"], W1["head_dim"]
    rng = np.random.default_rng(0)
    q, do = (rng.standard_normal((b, t, h, k), np.float32) for _ in range(2))
    kv = [rng.standard_normal((b, t, g, k), np.float32) for _ in range(2)]

    mechanism = resolve_mechanism("auto")
    attend = IMPLEMENTATIONS[mechanism]
    seg = jnp.asarray(segments)
    ours_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg) * jnp.asarray(do)), argnums=(0, 1, 2)))
    ours_args = [jnp.asarray(x) for x in (q, *kv)]

    def ours():
        jax.block_until_ready(ours_grad(*ours_args))

    torch.manual_seed(0)
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, *kv))
    tdo = torch.tensor(do).transpose(1, 2)
    seg_t = torch.tensor(segments)
    same_doc = (seg_t[:, None, :, None] == seg_t[:, None, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()

    def pytorch(mask):
        def step():
            for x in (tq, tk, tv):
                x.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
            (out * tdo).sum().backward()
        return step

    seconds = best_seconds(
        {"raysft": ours, "pytorch_causal": pytorch(None), "pytorch_document_mask": pytorch(same_doc)}, s.rounds
    )
    baseline = min(("pytorch_causal", "pytorch_document_mask"), key=seconds.get)
    print(json.dumps({
        "benchmark": "attention W1 forward + backward",
        "shape_b_t_h_kv_k": [b, t, h, g, k],
        "documents_per_row": round(float(np.mean([len(np.unique(r[r > 0])) for r in segments])), 2),
        "raysft_mechanism": mechanism,
        "worker_glibc_tunables": s.worker_tunables,
        "ms": {name: round(v * 1e3, 1) for name, v in seconds.items()},
        "pytorch_baseline": baseline,
        "ratio_raysft_over_pytorch": round(seconds[baseline] / seconds["raysft"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
