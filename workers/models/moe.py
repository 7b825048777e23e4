"""Mixture-of-experts decoder layers (Qwen3-MoE, Mixtral): Llama's pre-norm layer whose MLP,
in the sparse layers, is a router and `num_experts` gated MLPs (`experts` computes them).

Parameters as transformers 5 holds them: the router `mlp.gate` (a bias-free projection to
one logit per expert, run in fp32) and each projection of all experts as one tensor,
`mlp.experts.gate_proj.kernel` [E, D, F], `up_proj` [E, D, F], `down_proj` [E, F, D].
Layers that `mlp_only_layers` or `decoder_sparse_step` keep dense have Llama's MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models import llama
from raysft.workers.models.config import ModelConfig
from raysft.workers.models.decoder import DecoderForCausalLM
from raysft.workers.models.experts import dropless, expert_parallel, routing_sums, top_k_routing, with_capacity
from raysft.workers.models.lora import ADAPTER_DTYPE, LoraSettings
from raysft.workers.models.quantization import dequantize
from raysft.workers.models.runtime import ModelRuntime

class ExpertProjection(nnx.Module):
    """One projection of every expert, `kernel` [E, in, out]. Where LoRA adapts it, each
    expert has its own `lora_a` [E, in, r] and `lora_b` [E, r, out]; under QLoRA the
    kernel holds codes with their block scales, like `QuantizedLinear`'s."""

    def __init__(self, experts: int, fan_in: int, fan_out: int, kind: str, lora: LoraSettings | None, *, dtype,
                 param_dtype, rngs):
        quantization = lora.quantization if lora is not None else None
        if quantization is not None:  # read from the checkpoint and quantized on load
            self.kernel = nnx.Param(jnp.zeros((experts, fan_in, fan_out), quantization.code_dtype))
            self.kernel_scale = nnx.Param(jnp.ones((experts, fan_in // quantization.block, fan_out), jnp.float32))
        else:
            init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                                      batch_axis=(0,))
            self.kernel = nnx.Param(init(rngs.params(), (experts, fan_in, fan_out), param_dtype))
        self.adapted = lora is not None and kind in lora.modules
        if self.adapted:
            if lora.dropout:
                raise ValueError(
                    "lora_dropout applies to Linear projections; experts' LoRA takes none (PEFT's LoRA on "
                    "parameters refuses it too): set lora_dropout 0, or leave experts out of lora_target_modules"
                )
            bound = 1.0 / fan_in**0.5
            self.lora_a = nnx.Param(
                jax.random.uniform(rngs.params(), (experts, fan_in, lora.rank), ADAPTER_DTYPE, -bound, bound)
            )
            self.lora_b = nnx.Param(jnp.zeros((experts, lora.rank, fan_out), ADAPTER_DTYPE))
        self.quantization, self.dtype = quantization, dtype

    def weights(self) -> dict:
        """The kernel in the compute dtype (dequantized), and the adapters where it has them."""
        if self.quantization is not None:
            kernel = dequantize(self.kernel[...], self.kernel_scale[...], self.quantization, self.dtype)
        else:
            kernel = self.kernel[...].astype(self.dtype)
        if not self.adapted:
            return {"kernel": kernel}
        adapters = {leaf: getattr(self, leaf)[...].astype(self.dtype) for leaf in ("lora_a", "lora_b")}
        return {"kernel": kernel, **adapters}


class Experts(nnx.Module):
    """Every expert's gated MLP: `gate_proj`, `up_proj` [E, D, F] and `down_proj` [E, F, D]."""

    def __init__(self, cfg: ModelConfig, lora: LoraSettings | None, *, dtype, param_dtype, rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = ExpertProjection(e, d, f, "experts.gate_proj", lora, **kw)
        self.up_proj = ExpertProjection(e, d, f, "experts.up_proj", lora, **kw)
        self.down_proj = ExpertProjection(e, f, d, "experts.down_proj", lora, **kw)
        self.lora_scale = lora.scale if lora is not None else 1.0

    def weights(self) -> tuple[dict, dict, dict]:
        return self.gate_proj.weights(), self.up_proj.weights(), self.down_proj.weights()


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, runtime: ModelRuntime, lora: LoraSettings | None, *, dtype, param_dtype, rngs):
        # The router in fp32: its softmax decides which experts a token reaches.
        self.gate = nnx.Linear(
            cfg.hidden_size, cfg.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
        )
        self.experts = Experts(cfg, lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.top_k, self.renormalise, self.num_experts = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.num_experts
        self.activation, self.runtime = cfg.hidden_activation, runtime

    def __call__(self, x_BxTxD, real_BxT=None):
        """The experts' weighted sum for each token, and the layer's routing sums."""
        b, t, d = x_BxTxD.shape
        logits_NxE = self.gate(x_BxTxD.reshape(b * t, d).astype(jnp.float32))
        weights_NxK, experts_NxK, probs_NxE = top_k_routing(logits_NxE, self.top_k, self.renormalise)
        real_N = jnp.ones((b * t,), bool) if real_BxT is None else real_BxT.reshape(-1)
        sums = routing_sums(logits_NxE, probs_NxE, experts_NxK, real_N)
        mesh, projections, scale = self.runtime.mesh, self.experts.weights(), self.experts.lora_scale
        capacity = self.runtime.moe_capacity_factor
        if mesh is not None and mesh.size > 1:
            out_BxTxD, dropped = expert_parallel(
                mesh, x_BxTxD, experts_NxK.reshape(b, t, -1), weights_NxK.reshape(b, t, -1), real_N.reshape(b, t),
                projections, self.activation, self.num_experts, scale, capacity, self.runtime.moe_expert_parallel,
            )
        elif capacity is not None:
            out_NxD, dropped = with_capacity(
                x_BxTxD.reshape(b * t, d), experts_NxK, weights_NxK, real_N, projections, self.activation,
                self.num_experts, capacity, scale,
            )
            out_BxTxD = out_NxD.reshape(b, t, d)
        else:
            out_BxTxD = dropless(
                x_BxTxD.reshape(b * t, d), experts_NxK, weights_NxK, projections, self.activation,
                self.runtime.platform, self.num_experts, scale,
            ).reshape(b, t, d)
        if capacity is not None:  # of real tokens' assignments
            sums["dropped"] = jnp.sum(dropped.reshape(b * t, -1) * real_N[:, None].astype(jnp.float32))
        return out_BxTxD.astype(x_BxTxD.dtype), sums


class DecoderLayer(llama.DecoderLayer):
    def make_mlp(self, cfg: ModelConfig, index, runtime, *, dtype, param_dtype, rngs, lora):
        # Scanned layers are all of one kind (`DecoderModel` refuses a mix); a listed layer is its own.
        self.sparse = cfg.sparse_per_layer[0 if index is None else index]
        if self.sparse:
            return SparseMoeBlock(cfg, runtime or ModelRuntime(), lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        return super().make_mlp(cfg, index, runtime, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora)

    def routed_feed_forward(self, x_BxTxD, real_BxT=None, dropout_key=None):
        if not self.sparse:
            return super().routed_feed_forward(x_BxTxD, real_BxT, dropout_key)
        out_BxTxD, sums = self.mlp(self.post_attention_layernorm(x_BxTxD), real_BxT)
        return x_BxTxD + out_BxTxD, sums

    def feed_forward(self, x_BxTxD, dropout_key=None):
        if not self.sparse:
            return super().feed_forward(x_BxTxD, dropout_key)
        return self.routed_feed_forward(x_BxTxD, None, dropout_key)[0]


class MoeForCausalLM(DecoderForCausalLM):
    layer_class = DecoderLayer

