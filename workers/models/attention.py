"""Segment-aware causal attention, with one implementation per platform.

Every implementation takes q [B, T, H, K], k and v [B, S, G, K] (G divides H), the
`segment_ids` [B, T] of a packed row and an optional sliding window, and returns
[B, T, H, K]. A query attends to key s when s <= t, both are in the same segment, and
t - s < window. `vanilla` is the reference that the others are tested against.

`scale` multiplies the scores (default 1/sqrt(K); Gemma's is 1/sqrt(query_pre_attn_scalar))
and `softcap` bounds them to (-cap, cap) with cap * tanh(score / cap) before the mask, as
Gemma 2 does.

Under sequence parallelism each device holds T = S / sp of the queries and all S keys:
`q_offset` is the position of its first query and `kv_segment_ids` [B, S] the keys'
segments (by default S = T, offset 0, and the keys share the queries' segments).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_MECHANISMS = ("auto", "vanilla", "blocked", "dot_product", "splash")
# Splash tiles; rows must be a multiple of the tile so no block is partial.
_SPLASH_BLOCK = 512


def resolve_mechanism(name: str, platform: str | None = None) -> str:
    """`auto` is splash on TPU, `dot_product` on GPU (cuDNN) and `blocked` on CPU."""
    if name not in ATTENTION_MECHANISMS:
        raise ValueError(f"attn_mechanism {name!r} is not one of {', '.join(ATTENTION_MECHANISMS)}")
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "dot_product"}.get(platform, "blocked")


def _allowed(q_Tx1, k_1xS, window):
    allowed_TxS = k_1xS <= q_Tx1
    if window is not None:
        allowed_TxS = allowed_TxS & (q_Tx1 - k_1xS < window)
    return allowed_TxS


def attention_mask(segment_ids_BxT, window=None, kv_segment_ids_BxS=None, q_offset=0):
    """[B, T, S] True where query t may attend key s: causal, same document, in the window.
    `q_offset` (static or traced) is the first query's position."""
    kv_segment_ids_BxS = segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
    t, s = segment_ids_BxT.shape[1], kv_segment_ids_BxS.shape[1]
    allowed_TxS = _allowed(q_offset + jnp.arange(t)[:, None], jnp.arange(s)[None, :], window)
    same_doc_BxTxS = segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    return allowed_TxS[None] & same_doc_BxTxS


def capped(scores, softcap):
    """Gemma 2's attention-logit soft cap (None: the scores as they are)."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def vanilla_attention(
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window=None, *, kv_segment_ids=None, q_offset=0,
    scale=None, softcap=None,
):
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    mask_BxTxS = attention_mask(segment_ids_BxT, window, kv_segment_ids, q_offset)
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK) * (scale or d**-0.5)
    scores_BxGxRxTxS = capped(scores_BxGxRxTxS.astype(jnp.float32), softcap)
    scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxSxGxK)
    return out_BxTxGxRxK.reshape(b, t, h, d)


def blocked_attention(
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window=None, *, kv_segment_ids=None, q_offset=0,
    scale=None, softcap=None,
):
    """Vanilla attention one block of queries at a time, over only the keys that block
    can see: about half the work of the full T x S scores for causal rows, less with a
    window. Plain XLA, so it runs everywhere; about 2x vanilla's speed on CPU. With a
    traced query offset (a sequence shard) each block takes every key."""
    b, t, h, d = q_BxTxHxK.shape
    s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    kv_segment_ids = segment_ids_BxT if kv_segment_ids is None else kv_segment_ids
    static = isinstance(q_offset, (int, np.integer))
    block = max(64, t // 16)  # bounds the unrolled blocks (compile time) at 16 per layer
    q_BxGxRxTxK = (q_BxTxHxK * (scale or d**-0.5)).reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
    v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
    outs = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        k0, k1 = 0, s
        if static:
            k1 = min(q_offset + q1, s)
            k0 = 0 if window is None else max(0, (q_offset + q0 - window + 1) // block * block)
        scores_BxGxRxQxS = jnp.einsum(
            "bgrqk,bgsk->bgrqs", q_BxGxRxTxK[:, :, :, q0:q1], k_BxGxSxK[:, :, k0:k1]
        ).astype(jnp.float32)
        scores_BxGxRxQxS = capped(scores_BxGxRxQxS, softcap)
        allowed_QxS = _allowed(q_offset + jnp.arange(q0, q1)[:, None], jnp.arange(k0, k1)[None, :], window)
        same_doc_BxQxS = segment_ids_BxT[:, q0:q1, None] == kv_segment_ids[:, None, k0:k1]
        mask_BxQxS = allowed_QxS[None] & same_doc_BxQxS
        scores_BxGxRxQxS = jnp.where(mask_BxQxS[:, None, None], scores_BxGxRxQxS, jnp.finfo(jnp.float32).min)
        probs_BxGxRxQxS = jax.nn.softmax(scores_BxGxRxQxS, axis=-1).astype(v_BxGxSxK.dtype)
        outs.append(jnp.einsum("bgrqs,bgsk->bgrqk", probs_BxGxRxQxS, v_BxGxSxK[:, :, k0:k1]))
    out_BxGxRxTxK = jnp.concatenate(outs, axis=3)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def dot_product_attention(
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window=None, *, kv_segment_ids=None, q_offset=0,
    scale=None, softcap=None,
):
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in 16-bit, XLA elsewhere.
    It has no soft cap: a capped model (Gemma 2) takes the blocked form here."""
    if softcap is not None:
        return blocked_attention(
            q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window,
            kv_segment_ids=kv_segment_ids, q_offset=q_offset, scale=scale, softcap=softcap,
        )
    mask_Bx1xTxS = attention_mask(segment_ids_BxT, window, kv_segment_ids, q_offset)[:, None]
    if jax.default_backend() == "gpu" and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xTxS, scale=scale, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape or head size cuDNN does not take: XLA computes the same thing
    return jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xTxS, scale=scale, implementation="xla"
    )


def splash_block(seq_len: int, q_seq_shards: int = 1) -> int:
    """Splash's tile: 512 positions, or less for short rows; each sequence shard must hold
    whole query tiles."""
    block = min(_SPLASH_BLOCK, seq_len // q_seq_shards)
    if seq_len % (block * q_seq_shards):
        raise ValueError(
            f"splash attention needs max_sequence_length divisible by {block * q_seq_shards} "
            f"({q_seq_shards} sequence shards of {block}-position tiles), got {seq_len}"
        )
    return block


@functools.lru_cache(maxsize=32)
def splash_kernel(
    seq_len: int, heads_per_group: int, window: int | None, interpret: bool, q_seq_shards: int = 1,
    softcap: float | None = None,
):
    """The multi-query splash kernel for rows of `seq_len`, its mask split into
    `q_seq_shards` query shards (the kernel of one shard is taken with
    `manual_sharding_spec` inside `shard_map`), capping its scores at `softcap`."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (seq_len, seq_len)
    one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), 0)
    block_q, block_kv = splash_block(seq_len, q_seq_shards), min(_SPLASH_BLOCK, seq_len)
    sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    # The kernel holds its mask tables as arrays; built under a trace they would be
    # tracers, and this cache would leak them into the next trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa(
            masks.MultiHeadMask([one] * heads_per_group),
            block_sizes=sizes, head_shards=1, q_seq_shards=q_seq_shards, interpret=interpret,
            attn_logits_soft_cap=softcap,
        )


def splash_attention(
    q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxT, window=None, *, kv_segment_ids=None, q_offset=0,
    scale=None, softcap=None, kernel=None, interpret=None,
):
    """TPU Pallas splash attention; each KV group is one multi-query kernel call.

    `kernel` is a sequence shard's part of `splash_kernel(..., q_seq_shards)` (the
    kernel knows its queries' positions, so `q_offset` is not used); by default the
    whole row's. Off TPU it runs in Pallas interpret mode (slow; for tests on tiny shapes).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, d = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    if kernel is None:
        interpret = jax.default_backend() != "tpu" if interpret is None else interpret
        splash_block(t)
        kernel = splash_kernel(t, h // g, window, interpret, softcap=softcap)
    kv_segment_ids = segment_ids_BxT if kv_segment_ids is None else kv_segment_ids
    # The kernel does not scale: fold the scale into q as the other mechanisms do (the
    # kernel caps the scaled scores, as the others do).
    q_BxGxRxTxK = (q_BxTxHxK * (scale or d**-0.5)).reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
    v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)

    def one_row(q_GxRxTxK, k_GxSxK, v_GxSxK, seg_T, kv_seg_S):
        segments = SegmentIds(q=seg_T.astype(jnp.int32), kv=kv_seg_S.astype(jnp.int32))
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_GxRxTxK, k_GxSxK, v_GxSxK)

    out_BxGxRxTxK = jax.vmap(one_row)(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, segment_ids_BxT, kv_segment_ids)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_BxTxHxK.dtype)


IMPLEMENTATIONS = {
    "vanilla": vanilla_attention,
    "blocked": blocked_attention,
    "dot_product": dot_product_attention,
    "splash": splash_attention,
}
