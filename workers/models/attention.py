"""Segment-aware causal attention, with one implementation per platform.

Every implementation takes q [B, T, H, K], k and v [B, T, G, K] (G divides H), the
`segment_ids` [B, T] of a packed row and an optional sliding window, and returns
[B, T, H, K]. A query attends to key s when s <= t, both are in the same segment, and
t - s < window. `vanilla` is the reference that the others are tested against.
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


def attention_mask(segment_ids_BxT, window=None):
    """[B, T, T] True where query t may attend key s: causal, same document, in the window.

    `window` may be a traced scalar (scanned layers with different windows); a value
    >= T means no window.
    """
    t = segment_ids_BxT.shape[1]
    q_TxS = jnp.arange(t)[:, None]
    k_TxS = jnp.arange(t)[None, :]
    allowed_TxS = k_TxS <= q_TxS
    if window is not None:
        allowed_TxS = allowed_TxS & (q_TxS - k_TxS < window)
    same_doc_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return allowed_TxS[None] & same_doc_BxTxS


def vanilla_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window=None):
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    mask_BxTxS = attention_mask(segment_ids_BxT, window)
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d)
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK) * d**-0.5
    scores_BxGxRxTxS = scores_BxGxRxTxS.astype(jnp.float32)
    scores_BxGxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxTxGxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxTxGxK)
    return out_BxTxGxRxK.reshape(b, t, h, d)


def blocked_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window=None):
    """Vanilla attention one block of queries at a time, over only the keys that block
    can see: about half the work of the full T x T scores for causal rows, less with a
    window. Plain XLA, so it runs everywhere; about 2x vanilla's speed on CPU."""
    b, t, h, d = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    if window is not None and not isinstance(window, (int, np.integer)):
        return vanilla_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window)
    block = max(64, t // 16)  # bounds the unrolled blocks (compile time) at 16 per layer
    q_BxGxRxTxK = (q_BxTxHxK * d**-0.5).reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    k_BxGxTxK = k_BxTxGxK.transpose(0, 2, 1, 3)
    v_BxGxTxK = v_BxTxGxK.transpose(0, 2, 1, 3)
    outs = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        k0 = 0 if window is None else max(0, (q0 - window + 1) // block * block)
        scores_BxGxRxQxS = jnp.einsum(
            "bgrqk,bgsk->bgrqs", q_BxGxRxTxK[:, :, :, q0:q1], k_BxGxTxK[:, :, k0:q1]
        ).astype(jnp.float32)
        q_Qx1, k_1xS = jnp.arange(q0, q1)[:, None], jnp.arange(k0, q1)[None, :]
        allowed_QxS = (k_1xS <= q_Qx1) if window is None else (k_1xS <= q_Qx1) & (q_Qx1 - k_1xS < window)
        same_doc_BxQxS = segment_ids_BxT[:, q0:q1, None] == segment_ids_BxT[:, None, k0:q1]
        mask_BxQxS = allowed_QxS[None] & same_doc_BxQxS
        scores_BxGxRxQxS = jnp.where(mask_BxQxS[:, None, None], scores_BxGxRxQxS, jnp.finfo(jnp.float32).min)
        probs_BxGxRxQxS = jax.nn.softmax(scores_BxGxRxQxS, axis=-1).astype(v_BxGxTxK.dtype)
        outs.append(jnp.einsum("bgrqs,bgsk->bgrqk", probs_BxGxRxQxS, v_BxGxTxK[:, :, k0:q1]))
    out_BxGxRxTxK = jnp.concatenate(outs, axis=3)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window=None):
    """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in 16-bit, XLA elsewhere."""
    mask_Bx1xTxS = attention_mask(segment_ids_BxT, window)[:, None]
    if jax.default_backend() == "gpu" and q_BxTxHxK.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask_Bx1xTxS, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape or head size cuDNN does not take: XLA computes the same thing
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask_Bx1xTxS, implementation="xla")


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq_len: int, heads_per_group: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (seq_len, seq_len)
    one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window - 1, 0), 0)
    block = min(_SPLASH_BLOCK, seq_len)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    # The kernel holds its mask tables as arrays; built under a trace they would be
    # tracers, and this cache would leak them into the next trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa(
            masks.MultiHeadMask([one] * heads_per_group),
            block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
        )


def splash_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, window=None, *, interpret=None):
    """TPU Pallas splash attention; each KV group is one multi-query kernel call.

    Off TPU it runs in Pallas interpret mode (slow; for tests on tiny shapes).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, h, d = q_BxTxHxK.shape
    g = k_BxTxGxK.shape[2]
    if window is not None and not isinstance(window, (int, np.integer)):
        raise ValueError("splash attention needs the same sliding window in every scanned layer")
    block = min(_SPLASH_BLOCK, t)
    if t % block:
        raise ValueError(f"splash attention needs max_sequence_length divisible by {block}, got {t}")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kernel = _splash_kernel(t, h // g, window, interpret)
    # The kernel does not scale: fold 1/sqrt(K) into q as the other mechanisms do.
    q_BxGxRxTxK = (q_BxTxHxK * d**-0.5).reshape(b, t, g, h // g, d).transpose(0, 2, 3, 1, 4)
    k_BxGxTxK = k_BxTxGxK.transpose(0, 2, 1, 3)
    v_BxGxTxK = v_BxTxGxK.transpose(0, 2, 1, 3)
    segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)

    def one_row(q_GxRxTxK, k_GxTxK, v_GxTxK, seg_T):
        segments = SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_GxRxTxK, k_GxTxK, v_GxTxK)

    out_BxGxRxTxK = jax.vmap(one_row)(q_BxGxRxTxK, k_BxGxTxK, v_BxGxTxK, segment_ids_BxT)
    return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_BxTxHxK.dtype)


IMPLEMENTATIONS = {
    "vanilla": vanilla_attention,
    "blocked": blocked_attention,
    "dot_product": dot_product_attention,
    "splash": splash_attention,
}
