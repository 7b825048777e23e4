"""The decoder over a key/value cache, for generation: the prompts in one pass (prefill),
then one new token per row at a time (decode), each pass attending to what the cache holds.

Prompts of different lengths are left-padded to one length, so every row writes the same
cache slots at every step: row b's first real token is at slot `start_B[b]`, its
position (for RoPE) is its slot minus that, and its queries never see the slots before.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.config import ModelConfig
from raysft.workers.models.llama import LlamaForCausalLM, rope_cos_sin


class KVCache(NamedTuple):
    k_LxBxGxSxK: jax.Array
    v_LxBxGxSxK: jax.Array
    start_B: jax.Array  # each row's first real slot (its left padding)


def empty_cache(cfg: ModelConfig, start_B: jax.Array, length: int, dtype) -> KVCache:
    # Heads before slots: attention reads each layer's keys without transposing them.
    shape = (cfg.num_hidden_layers, start_B.shape[0], cfg.num_key_value_heads, length, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), start_B.astype(jnp.int32))


def forward_cached(model: LlamaForCausalLM, ids_BxT: jax.Array, cache: KVCache, index) -> tuple[jax.Array, KVCache]:
    """Final-norm hidden states [B, T, D] of `ids` written at cache slots index..index+T-1
    (`index` may be traced), and the cache holding their keys and values."""
    b, t = ids_BxT.shape
    length = cache.k_LxBxGxSxK.shape[3]
    slots_T = index + jnp.arange(t)
    positions_BxT = jnp.maximum(slots_T[None, :] - cache.start_B[:, None], 0)
    cos_BxTxK, sin_BxTxK = rope_cos_sin(positions_BxT, jnp.asarray(model.config.rope_inverse_frequencies()), model.dtype)
    prefill = isinstance(index, int) and index == 0
    key_slots_S = jnp.arange(length)
    distance_TxS = slots_T[:, None] - key_slots_S[None, :]
    visible_BxTxS = (distance_TxS >= 0)[None] & (key_slots_S[None, None, :] >= cache.start_B[:, None, None])

    def layer_step(layer, i, window, x_BxTxD, k_LxBxGxSxK, v_LxBxGxSxK):
        # The whole cache is carried and updated in place: slicing a layer out and stacking
        # the layers back would copy all of it at every decoded token.
        q_BxTxHxK, k_new, v_new = layer.self_attn.qkv(layer.input_layernorm(x_BxTxD), cos_BxTxK, sin_BxTxK)
        new_slots = (i, 0, 0, index, 0)
        k_LxBxGxSxK = jax.lax.dynamic_update_slice(k_LxBxGxSxK, _heads_first(k_new, k_LxBxGxSxK.dtype), new_slots)
        v_LxBxGxSxK = jax.lax.dynamic_update_slice(v_LxBxGxSxK, _heads_first(v_new, v_LxBxGxSxK.dtype), new_slots)
        if prefill:  # the cache holds nothing else yet: attend to the new keys alone
            k_BxGxSxK, v_BxGxSxK = _heads_first(k_new, q_BxTxHxK.dtype)[0], _heads_first(v_new, q_BxTxHxK.dtype)[0]
        else:
            k_BxGxSxK = jax.lax.dynamic_index_in_dim(k_LxBxGxSxK, i, keepdims=False).astype(q_BxTxHxK.dtype)
            v_BxGxSxK = jax.lax.dynamic_index_in_dim(v_LxBxGxSxK, i, keepdims=False).astype(q_BxTxHxK.dtype)
        mask_BxTxS = (visible_BxTxS & (distance_TxS < window)[None])[:, :, : k_BxGxSxK.shape[2]]
        attended_BxTxHxK = _cached_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS)
        return layer.feed_forward(x_BxTxD + layer.self_attn.out(attended_BxTxHxK)), k_LxBxGxSxK, v_LxBxGxSxK

    # "No window" is a window longer than the cache, so scanned layers share one program.
    window_L = jnp.asarray([length + 1 if w is None else w for w in model.config.window_per_layer], jnp.int32)
    carry = (model.model.embed_tokens(ids_BxT), cache.k_LxBxGxSxK, cache.v_LxBxGxSxK)
    if model.runtime.scan_layers:
        graphdef, stacked_state = nnx.split(model.model.layers)

        def body(carry, xs):
            state, i, window = xs
            return layer_step(nnx.merge(graphdef, state), i, window, *carry), None

        layer_index_L = jnp.arange(model.config.num_hidden_layers)
        carry, _ = jax.lax.scan(body, carry, (stacked_state, layer_index_L, window_L))
    else:
        for i, layer in enumerate(model.model.layers):
            carry = layer_step(layer, i, window_L[i], *carry)
    x_BxTxD, k_LxBxGxSxK, v_LxBxGxSxK = carry
    return model.model.norm(x_BxTxD), KVCache(k_LxBxGxSxK, v_LxBxGxSxK, cache.start_B)


def _heads_first(x_BxTxGxK, dtype):
    return x_BxTxGxK.transpose(0, 2, 1, 3)[None].astype(dtype)


def _cached_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS):
    """Attention's vanilla form where `mask` [B, T, S] is True, over keys laid out
    [B, G, S, K] as the cache holds them."""
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxGxSxK.shape[1]
    q_BxGxRxTxK = q_BxTxHxK.reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    scores_BxGxRxTxS = (jnp.einsum("bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK) * d**-0.5).astype(jnp.float32)
    scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxGxSxK.dtype)
    out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxS, v_BxGxSxK)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
