"""W1's LM head and loss (tied 49,152 x 256 embedding) with its gradient: raysft's
chunked loss against the minimal hand-written JAX form, autodiff of the cross-entropy
written out on the whole [rows x T, vocab] logits, on the same hidden states, in one
run (the two timed in turn, best of `repeats`). The loss's value is used, as a training
step uses it for its metrics.

    python benchmarks/loss_head.py [--rows 2] [--seq_len 2048] [--chunk 1024]

Rows longer than the chunk are where the chunked loss has to avoid recomputing each
chunk's logits in the backward pass; the temp memory shows what chunking saves.
"""

from __future__ import annotations

import json
import time

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

from train_throughput import W1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="loss_head.py")

    rows: int = 2
    seq_len: int = 2048
    chunk: int = 1024
    repeats: int = 5


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from raysft.workers.training.loss import token_loss_sums
    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.llama import LlamaForCausalLM
    from raysft.workers.models.params import ParamLayout

    s = Settings()
    cfg = ModelConfig.from_hf_dict({**W1, "architectures": ["LlamaForCausalLM"]})
    layout, params = ParamLayout.initialise(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    head_params = {n: p for n, p in params.items() if n == "model.embed_tokens.embedding"}  # tied
    rng = np.random.default_rng(0)
    hidden_BxTxD = jnp.asarray(rng.normal(size=(s.rows, s.seq_len, cfg.hidden_size)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (s.rows, s.seq_len)), jnp.int32)
    weights = jnp.ones((s.rows, s.seq_len), jnp.float32)

    def ours(head, h):
        model = layout.bind({**params, **head})
        sums = token_loss_sums(h, model.logits, ids, weights, s.chunk)
        return sums["objective"], sums["loss_sum"]

    def hand_written(head, h):
        logits = layout.bind({**params, **head}).logits(h)[:, :-1]
        target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        loss = jnp.sum(weights[:, 1:] * (jax.nn.logsumexp(logits, axis=-1) - target))
        return loss, loss

    programs = {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
                for name, fn in (("raysft", ours), ("hand_written", hand_written))}
    results = {name: jax.block_until_ready(p(head_params, hidden_BxTxD)) for name, p in programs.items()}
    (_, loss), grads = results["raysft"]
    (_, ref_loss), ref_grads = results["hand_written"]
    best = {name: float("inf") for name in programs}
    for _ in range(s.repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(head_params, hidden_BxTxD))
            best[name] = min(best[name], time.perf_counter() - start)
    temp = {name: p.lower(head_params, hidden_BxTxD).compile().memory_analysis().temp_size_in_bytes
            for name, p in programs.items()}
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), grads, ref_grads))
    print(json.dumps({
        "benchmark": f"loss_head W1 head + loss with gradient, {s.rows} x {s.seq_len} tokens, chunk {s.chunk}",
        "seconds": {name: round(v, 3) for name, v in best.items()},
        "speedup_over_hand_written": round(best["hand_written"] / best["raysft"], 3),
        "temp_MiB": {name: round(v / 2**20, 1) for name, v in temp.items()},
        "loss_relative_difference": float(abs(loss - ref_loss) / abs(ref_loss)),
        "gradient_max_relative_difference": max(differences),
    }, indent=2))


if __name__ == "__main__":
    main()
