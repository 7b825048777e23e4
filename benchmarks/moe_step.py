"""Mixture-of-experts training step against transformers' own, and raysft's dropless
grouped matmul against the dense one-hot form, each pair measured in one run on this
machine and printed as ratios (timings on shared machines are noisy):

    python benchmarks/moe_step.py                   # W1-sized Qwen3-MoE: 8 experts, top-2, batch 4 x 512
    python benchmarks/moe_step.py --num_experts 16 --num_experts_per_tok 4

1. The train step: raysft's (router in fp32, dropless grouped matmuls, the load-balancing
   loss in the objective) against `Qwen3MoeForCausalLM`'s forward and backward with
   `output_router_logits` (its aux loss added too) and AdamW, same shapes and batch.
2. The experts alone, forward and backward: the grouped matmul over the rows routed to
   each expert against the dense form that multiplies every token by every expert and
   masks all but its top-k (E / k times the FLOPs).
"""

from __future__ import annotations

import json

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker
from model_step import time_jax_training, time_steps, time_torch_training


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="moe_step.py")

    hidden_size: int = 256
    moe_intermediate_size: int = 384
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    vocab_size: int = 49152
    seq_len: int = 512
    batch_size: int = 4
    warmup_steps: int = 2
    steps: int = 5


def hf_config(s: Settings):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=4 * s.hidden_size,
        moe_intermediate_size=s.moe_intermediate_size, num_experts=s.num_experts,
        num_experts_per_tok=s.num_experts_per_tok, norm_topk_prob=True, num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
        head_dim=s.hidden_size // s.num_attention_heads, max_position_embeddings=s.seq_len, tie_word_embeddings=True,
    )


def ours(s: Settings, input_ids) -> float:
    from flax import nnx

    from raysft.workers.models.config import ModelConfig
    from raysft.workers.models.moe import MoeForCausalLM
    from raysft.workers.models.params import ParamLayout

    hf = hf_config(s)
    cfg = ModelConfig.from_hf_dict(hf.to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]})
    layout, params = ParamLayout.initialise(lambda: MoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return time_jax_training(layout, params, input_ids, s.warmup_steps, s.steps, loss_chunk_size=1024,
                             router=(hf.router_aux_loss_coef, 0.0))


def pytorch(s: Settings, input_ids) -> float:
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    # With its aux loss added, as raysft's objective has it.
    return time_torch_training(Qwen3MoeForCausalLM(hf_config(s)), input_ids, s.warmup_steps, s.steps,
                               output_router_logits=True)


def experts_only(s: Settings) -> dict[str, float]:
    """Seconds per forward and backward of one layer's experts over the batch's tokens:
    dropless grouped matmuls, and the dense one-hot form."""
    import jax
    import jax.numpy as jnp

    from raysft.workers.models.decoder import ACTIVATIONS
    from raysft.workers.models.experts import dropless, top_k_routing

    n, d, f, e, k = s.batch_size * s.seq_len, s.hidden_size, s.moe_intermediate_size, s.num_experts, s.num_experts_per_tok
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    weights, experts, _ = top_k_routing(jax.random.normal(keys[1], (n, e)), k, True)
    gate, up = (jax.random.normal(key, (e, d, f)) * d**-0.5 for key in keys[2:4])
    down = jax.random.normal(keys[4], (e, f, d)) * f**-0.5

    def grouped(x, gate, up, down):
        projections = ({"kernel": gate}, {"kernel": up}, {"kernel": down})
        return jnp.sum(dropless(x, experts, weights, projections, "silu", "cpu", e) ** 2)

    def one_hot(x, gate, up, down):
        combine_NxE = jnp.sum(jax.nn.one_hot(experts, e) * weights[..., None], axis=1)  # 0 off the top-k
        hidden = ACTIVATIONS["silu"](jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
        return jnp.sum(jnp.einsum("enf,efd,ne->nd", hidden, down, combine_NxE) ** 2)

    out = {}
    for name, fn in (("grouped", grouped), ("one_hot", one_hot)):
        step_fn = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3)))
        out[name] = time_steps(lambda: jax.block_until_ready(step_fn(x, gate, up, down)), s.warmup_steps, s.steps)
    return out


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax
    import numpy as np

    s = Settings()
    input_ids = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch_size, s.seq_len)).astype(np.int64)
    tokens = s.batch_size * s.seq_len
    ours_s, torch_s = ours(s, input_ids), pytorch(s, input_ids)
    layer = experts_only(s)
    print(json.dumps({
        "benchmark": "moe_step",
        "device": jax.devices()[0].device_kind,
        "config": s.model_dump(),
        "raysft_tokens_per_s": round(tokens / ours_s, 1),
        "transformers_tokens_per_s": round(tokens / torch_s, 1),
        "ratio_raysft_over_transformers": round(torch_s / ours_s, 3),
        "experts_grouped_ms": round(1000 * layer["grouped"], 2),
        "experts_one_hot_ms": round(1000 * layer["one_hot"], 2),
        "ratio_grouped_over_one_hot": round(layer["one_hot"] / layer["grouped"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
