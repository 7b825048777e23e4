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


@jax.custom_vjp
def _chunk_sums(logits_BxCxV, targets_BxC, weights_BxC):
    """Sums over any leading axes ([B, C] or [B, S, C])."""
    return _chunk_sums_forward(logits_BxCxV, targets_BxC, weights_BxC)[0]


def _chunk_sums_forward(logits_BxCxV, targets_BxC, weights_BxC):
    f32_BxCxV = logits_BxCxV.astype(jnp.float32)
    max_BxC = jnp.max(f32_BxCxV, axis=-1)
    log_norm_BxC = jnp.log(jnp.sum(jnp.exp(f32_BxCxV - max_BxC[..., None]), axis=-1)) + max_BxC
    target_logit_BxC = jnp.take_along_axis(f32_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    # The target is the prediction when its logit is the largest: XLA:CPU's argmax (a
    # reduction of value-index pairs) takes as long as the exp-sum. Unlike argmax, a
    # tie with another token counts as correct (only exactly equal logits tie).
    correct_BxC = target_logit_BxC >= max_BxC
    sums = {
        "loss_sum": jnp.sum((log_norm_BxC - target_logit_BxC) * weights_BxC),
        "z_sum": jnp.sum(jnp.square(log_norm_BxC) * weights_BxC),
        "correct": jnp.sum(correct_BxC * weights_BxC),
        "weight_sum": jnp.sum(weights_BxC),
    }
    return sums, (logits_BxCxV, log_norm_BxC, targets_BxC, weights_BxC)


def _chunk_sums_backward(residuals, g):
    """The logits' cotangent in one pass over [.., V], the step's largest array: softmax
    times each row's weight, minus the loss weight at the target. Autodiff keeps the
    softmax from the forward pass and scatters the target term into a zero [.., V]
    array, two more passes over it. The barrier makes XLA write the cotangent once
    instead of recomputing it inside each of the two products that read it."""
    logits_BxCxV, log_norm_BxC, targets_BxC, weights_BxC = residuals
    target_g_BxC = weights_BxC * g["loss_sum"]
    row_g_BxC = target_g_BxC + weights_BxC * g["z_sum"] * 2 * log_norm_BxC
    probs_BxCxV = jnp.exp(logits_BxCxV.astype(jnp.float32) - log_norm_BxC[..., None])
    is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
    d_logits = probs_BxCxV * row_g_BxC[..., None] - jnp.where(is_target_BxCxV, target_g_BxC[..., None], 0.0)
    return jax.lax.optimization_barrier(d_logits.astype(logits_BxCxV.dtype)), None, None


_chunk_sums.defvjp(_chunk_sums_forward, _chunk_sums_backward)


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
