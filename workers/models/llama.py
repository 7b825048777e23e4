"""Llama-family decoder in Flax NNX, laid out like Hugging Face's so names map 1:1.

Packed rows: `segment_ids` [B, T] (0 = padding) keep documents from attending to each
other and `positions` [B, T] restart RoPE at every document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.config import LlamaConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_BxTxD):
        # Normalise in fp32 as transformers does, then cast back before the scale.
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        normed_BxTxD = (x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed_BxTxD


def rope_cos_sin(positions_BxT, inv_freq_K2, dtype):
    angles_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)
    return jnp.cos(angles_BxTxK).astype(dtype), jnp.sin(angles_BxTxK).astype(dtype)


def apply_rope(x_BxTxNxK, cos_BxTxK, sin_BxTxK):
    half = x_BxTxNxK.shape[-1] // 2
    rotated_BxTxNxK = jnp.concatenate([-x_BxTxNxK[..., half:], x_BxTxNxK[..., :half]], axis=-1)
    return x_BxTxNxK * cos_BxTxK[:, :, None, :] + rotated_BxTxNxK * sin_BxTxK[:, :, None, :]


def attention_mask(segment_ids_BxT):
    """[B, T, T] True where query t may attend key s: causal and same document."""
    t = segment_ids_BxT.shape[1]
    causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxT[None] & same_doc_BxTxT


def vanilla_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxT):
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK) * d**-0.5
    scores_BxGxRxTxS = scores_BxGxRxTxS.astype(jnp.float32)
    scores_BxGxRxTxS = jnp.where(mask_BxTxT[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxTxGxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxTxGxK)
    return out_BxTxGxRxK.reshape(b, t, h, d)


def _linear(fan_in, fan_out, *, dtype, param_dtype, rngs):
    return nnx.Linear(fan_in, fan_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, g, k = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = _linear(cfg.hidden_size, h * k, **kw)
        self.k_proj = _linear(cfg.hidden_size, g * k, **kw)
        self.v_proj = _linear(cfg.hidden_size, g * k, **kw)
        self.o_proj = _linear(h * k, cfg.hidden_size, **kw)
        self.heads, self.kv_heads, self.head_dim = h, g, k

    def __call__(self, x_BxTxD, cos_BxTxK, sin_BxTxK, mask_BxTxT):
        b, t, _ = x_BxTxD.shape
        q_BxTxHxK = self.q_proj(x_BxTxD).reshape(b, t, self.heads, self.head_dim)
        k_BxTxGxK = self.k_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        v_BxTxGxK = self.v_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        q_BxTxHxK = apply_rope(q_BxTxHxK, cos_BxTxK, sin_BxTxK)
        k_BxTxGxK = apply_rope(k_BxTxGxK, cos_BxTxK, sin_BxTxK)
        out_BxTxHxK = vanilla_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxT)
        return self.o_proj(out_BxTxHxK.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x_BxTxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, **kw, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxK, sin_BxTxK, mask_BxTxT):
        x_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxK, sin_BxTxK, mask_BxTxT)
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, **kw, rngs=rngs) for _ in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)


class LlamaForCausalLM(nnx.Module):
    """`__call__` returns logits [B, T, vocab] in the compute dtype."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        self.model = LlamaModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None):
        """Final-norm hidden states [B, T, D]."""
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(input_ids_BxT)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        cos_BxTxK, sin_BxTxK = rope_cos_sin(
            positions_BxT, jnp.asarray(self.config.rope_inverse_frequencies()), self.dtype
        )
        mask_BxTxT = attention_mask(segment_ids_BxT)
        x_BxTxD = self.model.embed_tokens(input_ids_BxT)
        for layer in self.model.layers:
            x_BxTxD = layer(x_BxTxD, cos_BxTxK, sin_BxTxK, mask_BxTxT)
        return self.model.norm(x_BxTxD)

    def logits(self, hidden_BxTxD):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden_BxTxD)
        return self.lm_head(hidden_BxTxD)

    def __call__(self, input_ids_BxT, segment_ids_BxT=None, positions_BxT=None):
        return self.logits(self.hidden_states(input_ids_BxT, segment_ids_BxT, positions_BxT))
