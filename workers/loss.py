"""Next-token cross-entropy weighted per target token, computed a chunk of rows' positions
at a time so the [batch, T, vocab] logits never exist all at once."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _shifted_targets(input_ids_BxT, loss_weights_BxT):
    """Position t predicts token t+1 with weight `loss_weights[t+1]`; the last predicts nothing."""
    targets_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
    weights_BxT = jnp.pad(loss_weights_BxT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    return targets_BxT, weights_BxT


def _chunk_sums(logits_BxCxV, targets_BxC, weights_BxC):
    """Sums over any leading axes ([B, C] or [B, S, C])."""
    logits_BxCxV = logits_BxCxV.astype(jnp.float32)
    log_norm_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    correct_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
    return {
        "loss_sum": jnp.sum((log_norm_BxC - target_logit_BxC) * weights_BxC),
        "z_sum": jnp.sum(jnp.square(log_norm_BxC) * weights_BxC),
        "correct": jnp.sum(correct_BxC * weights_BxC),
        "weight_sum": jnp.sum(weights_BxC),
    }


def token_loss_sums(
    hidden_BxTxD,
    head: Callable,
    input_ids_BxT,
    loss_weights_BxT,
    chunk_size: int | None = None,
    sequence_shards: int = 1,
) -> dict[str, jax.Array]:
    """Sums over the batch: weighted token losses, weighted squared log-normalisers (for
    z-loss), weighted correct argmax predictions, and the weights.

    `head` maps hidden states [..., D] to logits [..., V]. With `chunk_size`, each of the
    `sequence_shards` equal parts of the sequence (the positions one `sp` device holds)
    is cut into chunks of that many positions; step k of the scan takes chunk k of every
    part, so each device works on its own positions, and each chunk's logits are
    recomputed in the backward pass instead of stored. Sums rather than means, so the
    caller divides once by the weight of the whole global batch.
    """
    targets_BxT, weights_BxT = _shifted_targets(input_ids_BxT, loss_weights_BxT)
    b, t, _ = hidden_BxTxD.shape
    local = t // sequence_shards
    if not chunk_size or chunk_size >= local:
        return _chunk_sums(head(hidden_BxTxD), targets_BxT, weights_BxT)
    chunks = -(-local // chunk_size)
    pad = chunks * chunk_size - local  # padded positions have weight 0

    def split(x_BxT_):  # [B, T, ...] -> [chunks, B, sequence_shards, chunk_size, ...]
        x = x_BxT_.reshape(b, sequence_shards, local, *x_BxT_.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(b, sequence_shards, chunks, chunk_size, *x.shape[3:]), 2, 0)

    @jax.checkpoint
    def one_chunk(totals, xs):
        hidden_BxSxCxD, targets_BxSxC, weights_BxSxC = xs
        sums = _chunk_sums(head(hidden_BxSxCxD), targets_BxSxC, weights_BxSxC)
        return jax.tree.map(jnp.add, totals, sums), None

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_sum", "correct", "weight_sum")}
    totals, _ = jax.lax.scan(one_chunk, zeros, (split(hidden_BxTxD), split(targets_BxT), split(weights_BxT)))
    return totals
