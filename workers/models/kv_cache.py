"""The decoder over a key/value cache, for generation: the prompts in one pass (prefill),
then one new token per row at a time (decode), each pass attending to what the cache holds.

Prompts of different lengths are left-padded to one length, so every row writes the same
cache slots at every step: row b's first real token is at slot `start_B[b]`, its
position (for RoPE) is its slot minus that, and its queries never see the slots before.

A sliding-window layer keeps only its window: its keys go to a ring of W slots (slot s at
s mod W), so Gemma 3, whose layers are five sliding (1,024) to one global, caches about a
quarter of what full-length caches would hold at 8k tokens. Layers that see every earlier
token keep them all.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from raysft.workers.models.attention import capped
from raysft.workers.models.config import ModelConfig
from raysft.workers.models.decoder import DecoderForCausalLM, rope_per_table


class KVCache(NamedTuple):
    k_LxBxGxSxK: jax.Array  # the layers that see every earlier token, S slots each
    v_LxBxGxSxK: jax.Array
    k_RxBxGxWxK: jax.Array  # the sliding layers' rings of W slots
    v_RxBxGxWxK: jax.Array
    start_B: jax.Array  # each row's first real slot (its left padding)


def _routes(cfg: ModelConfig, ring_width: int) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """Per layer: whether it keeps a ring (its window fits one), and its index among the
    layers of its kind."""
    ring = tuple(w is not None and w <= ring_width for w in cfg.window_per_layer)
    counts = {True: 0, False: 0}
    index = []
    for kind in ring:
        index.append(counts[kind])
        counts[kind] += 1
    return ring, tuple(index)


def empty_cache(cfg: ModelConfig, start_B: jax.Array, length: int, dtype) -> KVCache:
    """A cache of `length` slots; a layer whose window is shorter keeps a ring of it."""
    windows = [w for w in cfg.window_per_layer if w is not None and w < length]
    ring, _ = _routes(cfg, max(windows, default=0))
    # Heads before slots: attention reads each layer's keys without transposing them.
    rows, g, k = start_B.shape[0], cfg.num_key_value_heads, cfg.head_dim
    full = (ring.count(False), rows, g, length, k)
    rings = (ring.count(True), rows, g, max(windows, default=0), k)
    zeros = functools.partial(jnp.zeros, dtype=dtype)
    return KVCache(zeros(full), zeros(full), zeros(rings), zeros(rings), start_B.astype(jnp.int32))


def forward_cached(model: DecoderForCausalLM, ids_BxT: jax.Array, cache: KVCache, index) -> tuple[jax.Array, KVCache]:
    """Final-norm hidden states [B, T, D] of `ids` written at cache slots index..index+T-1
    (`index` may be traced; T > 1 only for the prefill at 0), and the cache holding their
    keys and values."""
    cfg = model.config
    t = ids_BxT.shape[1]
    slots_T = index + jnp.arange(t)
    positions_BxT = jnp.maximum(slots_T[None, :] - cache.start_B[:, None], 0)
    cos_RxBxTxK, sin_RxBxTxK = rope_per_table(cfg, positions_BxT, model.dtype)
    prefill = isinstance(index, int) and index == 0
    ring_width = cache.k_RxBxGxWxK.shape[3]
    attention = functools.partial(_cached_attention, scale=cfg.attention_scale, softcap=cfg.attn_logit_softcapping)

    def attend(ring: bool, position, window, q_BxTxHxK, k_new, v_new, caches):
        """Write the new keys and values to the layer's cache (its ring, or all slots) and
        attend to what it holds."""
        k_all, v_all, k_ring, v_ring = caches
        k_new, v_new = _heads_first(k_new, k_all.dtype), _heads_first(v_new, k_all.dtype)
        if ring:
            write = functools.partial(_write_ring, position=position, index=index, prefill=prefill)
            k_ring, v_ring = write(k_ring, k_new), write(v_ring, v_new)
            k_cache, v_cache = k_ring, v_ring
            # Ring slot j holds the latest slot a <= index with a = j (mod W).
            key_slots_S = index - jnp.mod(index - jnp.arange(ring_width), ring_width)
        else:
            write = functools.partial(jax.lax.dynamic_update_slice, start_indices=(position, 0, 0, index, 0))
            k_all, v_all = write(k_all, k_new), write(v_all, v_new)
            k_cache, v_cache = k_all, v_all
            key_slots_S = jnp.arange(k_all.shape[3])
        if prefill:  # the cache holds nothing else yet: attend to the new keys alone
            k_BxGxSxK, v_BxGxSxK, key_slots_S = k_new[0], v_new[0], slots_T
        else:
            k_BxGxSxK = jax.lax.dynamic_index_in_dim(k_cache, position, keepdims=False)
            v_BxGxSxK = jax.lax.dynamic_index_in_dim(v_cache, position, keepdims=False)
        distance_TxS = slots_T[:, None] - key_slots_S[None, :]
        visible_BxTxS = ((distance_TxS >= 0) & (distance_TxS < window))[None] & (
            key_slots_S[None, None, :] >= cache.start_B[:, None, None]
        )
        dtype = q_BxTxHxK.dtype
        attended = attention(q_BxTxHxK, k_BxGxSxK.astype(dtype), v_BxGxSxK.astype(dtype), visible_BxTxS)
        return attended, (k_all, v_all, k_ring, v_ring)

    def layer_step(layer, ring, position, window, table, x_BxTxD, caches):
        # The caches are carried and updated in place: slicing a layer out and stacking
        # the layers back would copy all of them at every decoded token.
        cos_BxTxK, sin_BxTxK = cos_RxBxTxK[table], sin_RxBxTxK[table]
        q_BxTxHxK, k_new, v_new = layer.self_attn.qkv(layer.attention_input(x_BxTxD), cos_BxTxK, sin_BxTxK)
        args = (position, window, q_BxTxHxK, k_new, v_new, caches)
        if isinstance(ring, bool):
            attended_BxTxHxK, caches = attend(ring, *args)
        else:  # scanned layers of both kinds
            branches = functools.partial(attend, True), functools.partial(attend, False)
            attended_BxTxHxK, caches = jax.lax.cond(ring, *branches, *args)
        x_BxTxD = layer.add_attention(x_BxTxD, layer.self_attn.out(attended_BxTxHxK))
        return layer.feed_forward(x_BxTxD), caches

    length = cache.k_LxBxGxSxK.shape[3] if cache.k_LxBxGxSxK.shape[0] else ring_width
    # "No window" is a window longer than the cache, so scanned layers share one program.
    window_L = jnp.asarray([length + 1 if w is None else w for w in cfg.window_per_layer], jnp.int32)
    ring_L, position_L = _routes(cfg, ring_width)
    caches = (cache.k_LxBxGxSxK, cache.v_LxBxGxSxK, cache.k_RxBxGxWxK, cache.v_RxBxGxWxK)
    x_BxTxD = model.embed(ids_BxT)
    if model.runtime.scan_layers:
        graphdef, stacked_state = nnx.split(model.model.layers)
        static_ring = ring_L[0] if len(set(ring_L)) == 1 else None

        def body(carry, xs):
            state, ring, position, window, table = xs
            ring = static_ring if static_ring is not None else ring
            return layer_step(nnx.merge(graphdef, state), ring, position, window, table, *carry), None

        xs = (stacked_state, jnp.asarray(ring_L), jnp.asarray(position_L, jnp.int32), window_L,
              jnp.asarray(cfg.rope_table_per_layer, jnp.int32))
        (x_BxTxD, caches), _ = jax.lax.scan(body, (x_BxTxD, caches), xs)
    else:
        for i, layer in enumerate(model.model.layers):
            x_BxTxD, caches = layer_step(
                layer, ring_L[i], position_L[i], window_L[i], cfg.rope_table_per_layer[i], x_BxTxD, caches
            )
    return model.model.norm(x_BxTxD), KVCache(*caches, cache.start_B)


def _write_ring(ring_RxBxGxWxK, new_1xBxGxTxK, position, index, prefill: bool):
    """A layer's new keys (or values) into its ring: slot s at s mod W. A prefill keeps
    only its last W slots."""
    w, t = ring_RxBxGxWxK.shape[3], new_1xBxGxTxK.shape[3]
    if not prefill:  # one new slot
        return jax.lax.dynamic_update_slice(ring_RxBxGxWxK, new_1xBxGxTxK, (position, 0, 0, jnp.mod(index, w), 0))
    if t < w:  # slots 0..T-1 are ring slots 0..T-1
        return jax.lax.dynamic_update_slice(ring_RxBxGxWxK, new_1xBxGxTxK, (position, 0, 0, 0, 0))
    last_1xBxGxWxK = jnp.roll(new_1xBxGxTxK[:, :, :, t - w:], (t - w) % w, axis=3)
    return jax.lax.dynamic_update_slice(ring_RxBxGxWxK, last_1xBxGxWxK, (position, 0, 0, 0, 0))


def _heads_first(x_BxTxGxK, dtype):
    return x_BxTxGxK.transpose(0, 2, 1, 3)[None].astype(dtype)


def _cached_attention(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, mask_BxTxS, scale=None, softcap=None):
    """Attention's vanilla form where `mask` [B, T, S] is True, over keys laid out
    [B, G, S, K] as the cache holds them."""
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxGxSxK.shape[1]
    q_BxGxRxTxK = q_BxTxHxK.reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    scores_BxGxRxTxS = jnp.einsum("bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK) * (scale or d**-0.5)
    scores_BxGxRxTxS = capped(scores_BxGxRxTxS.astype(jnp.float32), softcap)
    scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxGxSxK.dtype)
    out_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxS, v_BxGxSxK)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
