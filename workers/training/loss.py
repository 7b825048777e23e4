"""Next-token cross-entropy weighted per target token, computed a chunk of rows' positions
at a time so the [batch, T, vocab] logits never exist all at once, with its gradient
computed in the same pass."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def _chunking(shape_BxT, chunk_size: int | None, sequence_shards: int):
    """(split, merge): [B, T, ...] to [chunks, B, sequence_shards, chunk, ...] (padded at
    the end of each shard's positions) and back."""
    b, t = shape_BxT
    local = t // sequence_shards
    chunk = min(chunk_size or local, local)
    chunks = -(-local // chunk)
    pad = chunks * chunk - local  # padded positions have weight 0

    def split(x_BxT_):
        x = x_BxT_.reshape(b, sequence_shards, local, *x_BxT_.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(b, sequence_shards, chunks, chunk, *x.shape[3:]), 2, 0)

    def merge(x_NxBxSxC):
        x = jnp.moveaxis(x_NxBxSxC, 0, 2).reshape(b, sequence_shards, chunks * chunk)
        return x[:, :, :local].reshape(b, t)

    return split, merge


def _shifted_targets(input_ids_BxT, loss_weights_BxT):
    """Position t predicts token t+1 with weight `loss_weights[t+1]`; the last predicts nothing."""
    targets_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
    weights_BxT = jnp.pad(loss_weights_BxT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    return targets_BxT, weights_BxT


def _chunk_stats(logits_BxCxV, targets_BxC, weights_BxC):
    """The sums over any leading axes ([B, C] or [B, S, C]), and each position's log Z."""
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
    return sums, log_norm_BxC


def _logits_cotangent(logits_BxCxV, log_norm_BxC, targets_BxC, weights_BxC, z_loss):
    """d(loss_sum + z_loss * z_sum) / d(logits) in one pass over [.., V], the step's
    largest array: softmax times each row's weight, minus the weight at the target
    (autodiff keeps the softmax and scatters the target term into a zero [.., V] array,
    two more passes). The barrier makes XLA write it once instead of recomputing it
    inside each of the two products that read it."""
    row_g_BxC = weights_BxC * (1.0 + 2.0 * z_loss * log_norm_BxC)
    probs_BxCxV = jnp.exp(logits_BxCxV.astype(jnp.float32) - log_norm_BxC[..., None])
    is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
    d_logits = probs_BxCxV * row_g_BxC[..., None] - jnp.where(is_target_BxCxV, weights_BxC[..., None], 0.0)
    return jax.lax.optimization_barrier(d_logits.astype(logits_BxCxV.dtype))


def _zeros():
    return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_sum", "correct", "weight_sum")}


def _add(totals, sums):
    return jax.tree.map(jnp.add, totals, sums)


def _objective(sums, z_loss):
    return sums["loss_sum"] + z_loss * sums["z_sum"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _head_loss(head, z_loss, hidden_NxBxSxCxD, targets_NxBxSxC, weights_NxBxSxC, *head_params):
    """(loss_sum + z_loss * z_sum, the sums) of the logits `head(hidden, *head_params)`,
    one chunk of positions (the leading axis) at a time."""

    def one_chunk(totals, xs):
        hidden, targets, weights = xs
        return _add(totals, _chunk_stats(head(hidden, *head_params), targets, weights)[0]), None

    sums, _ = jax.lax.scan(one_chunk, _zeros(), (hidden_NxBxSxCxD, targets_NxBxSxC, weights_NxBxSxC))
    return _objective(sums, z_loss), sums


def _head_loss_forward(head, z_loss, hidden, targets, weights, *head_params):
    """The gradient is computed here, chunk by chunk while each chunk's logits exist (as
    Liger's fused linear cross-entropy does): the backward pass then has nothing to
    recompute, and no chunk's logits outlive it. It is the gradient of the objective for
    a cotangent of 1, which the backward rule scales. Parameters that are not trained
    (a frozen head under LoRA) get none."""
    hidden, targets, weights = hidden.value, targets.value, weights.value
    trained = [i for i, p in enumerate(head_params) if p.perturbed]
    values = [p.value for p in head_params]

    def trained_head(h, *trained_values):
        args = list(values)
        for i, v in zip(trained, trained_values):
            args[i] = v
        return head(h, *args)

    def one_chunk(carry, xs):
        totals, grads = carry
        h, t, w = xs
        logits, head_vjp = jax.vjp(trained_head, h, *[values[i] for i in trained])
        sums, log_norm = _chunk_stats(logits, t, w)
        d_hidden, *d_params = head_vjp(_logits_cotangent(logits, log_norm, t, w, z_loss))
        return (_add(totals, sums), _add(grads, d_params)), d_hidden

    zero_grads = [jnp.zeros_like(values[i]) for i in trained]
    (sums, grads), d_hidden = jax.lax.scan(one_chunk, (_zeros(), zero_grads), (hidden, targets, weights))
    by_param = [None] * len(head_params)  # None: not trained
    for i, grad in zip(trained, grads):
        by_param[i] = grad
    return (_objective(sums, z_loss), sums), (d_hidden, by_param)


def _head_loss_backward(head, z_loss, residuals, g):
    """Only the objective carries a gradient: `token_loss_sums` stops it on the sums."""
    d_hidden, by_param = residuals
    g_objective = g[0]
    if isinstance(g_objective, SymbolicZero):
        return (None, None, None) + (None,) * len(by_param)
    scale = lambda x: None if x is None else (x * g_objective).astype(x.dtype)  # noqa: E731
    return (scale(d_hidden), None, None, *map(scale, by_param))


_head_loss.defvjp(_head_loss_forward, _head_loss_backward, symbolic_zeros=True)


def token_loss_sums(
    hidden_BxTxD,
    head: Callable,
    input_ids_BxT,
    loss_weights_BxT,
    chunk_size: int | None = None,
    sequence_shards: int = 1,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Sums over the batch: weighted token losses, weighted squared log-normalisers (for
    z-loss), weighted correct argmax predictions, the weights, and `objective` =
    loss_sum + z_loss * z_sum, the one sum that carries a gradient.

    `head` maps hidden states [..., D] to logits [..., V]. With `chunk_size`, each of the
    `sequence_shards` equal parts of the sequence (the positions one `sp` device holds)
    is cut into chunks of that many positions; step k of the scan takes chunk k of every
    part, so each device works on its own positions. Sums rather than means, so the
    caller divides once by the weight of the whole global batch.
    """
    targets_BxT, weights_BxT = _shifted_targets(input_ids_BxT, loss_weights_BxT)
    split, _ = _chunking(hidden_BxTxD.shape[:2], chunk_size, sequence_shards)
    hidden_NxBxSxCxD = split(hidden_BxTxD)
    # The head's parameters become explicit arguments, so the loss's own VJP can return
    # their gradient.
    head, head_params = jax.closure_convert(head, hidden_NxBxSxCxD[0])
    objective, sums = _head_loss(head, z_loss, hidden_NxBxSxCxD, split(targets_BxT), split(weights_BxT), *head_params)
    return {"objective": objective, **jax.lax.stop_gradient(sums)}


def target_log_probs(
    hidden_BxTxD, head: Callable, input_ids_BxT, chunk_size: int | None = None, sequence_shards: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """(log p(token t+1 | tokens up to t), whether token t+1 has the largest logit), both
    [B, T] at position t (the last position predicts nothing: 0 and False), for objectives
    that need each sequence's log-probability rather than a sum over tokens. Chunked as
    `token_loss_sums`; each chunk's logits are recomputed in the backward pass rather than
    kept, so only one chunk's [.., V] exists at a time."""
    targets_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
    split, merge = _chunking(hidden_BxTxD.shape[:2], chunk_size, sequence_shards)

    @jax.checkpoint
    def one_chunk(hidden, targets):
        f32 = head(hidden).astype(jnp.float32)
        target_logit = jnp.take_along_axis(f32, targets[..., None], axis=-1)[..., 0]
        log_norm = jax.nn.logsumexp(f32, axis=-1)
        return target_logit - log_norm, jax.lax.stop_gradient(target_logit >= jnp.max(f32, axis=-1))

    log_probs, top = jax.lax.map(lambda xs: one_chunk(*xs), (split(hidden_BxTxD), split(targets_BxT)))
    last = jnp.arange(input_ids_BxT.shape[1]) < input_ids_BxT.shape[1] - 1
    return jnp.where(last, merge(log_probs), 0.0), merge(top) & last
