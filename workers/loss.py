"""Next-token cross-entropy weighted per target token."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_token_loss(logits_BxTxV, input_ids_BxT, loss_weights_BxT):
    """(sum of weighted token losses, sum of weights, weighted correct predictions).

    Position t predicts token t+1 with weight `loss_weights[t+1]`. Sums rather than a
    mean, so the caller divides once by the weight of the whole global batch.
    """
    logits_BxSxV = logits_BxTxV[:, :-1].astype(jnp.float32)
    targets_BxS = input_ids_BxT[:, 1:]
    weights_BxS = loss_weights_BxT[:, 1:].astype(jnp.float32)
    log_norm_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    target_logit_BxS = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum((log_norm_BxS - target_logit_BxS) * weights_BxS)
    correct = jnp.sum((jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS) * weights_BxS)
    return loss_sum, jnp.sum(weights_BxS), correct
