"""Pure jitted steps: (params, optimizer state, batch) in, new state and metrics out."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from raysft.workers.loss import weighted_token_loss
from raysft.workers.models.params import ParamLayout


def _batch_sums(layout: ParamLayout, params, batch):
    logits_BxTxV = layout.bind(params)(batch["input_ids"], batch["segment_ids"], batch["positions"])
    return weighted_token_loss(logits_BxTxV, batch["input_ids"], batch["loss_weights"])


def make_train_step(layout: ParamLayout, optimizer: optax.GradientTransformation, shardings) -> Callable:
    """`train_step(params, opt_state, batch) -> (params, opt_state, metrics)`.

    The loss is normalised by the supervised tokens of the whole global batch (the jitted
    sums run over every host's rows), so it does not depend on how rows are split.
    """

    def loss_fn(params, batch):
        loss_sum, weight_sum, correct = _batch_sums(layout, params, batch)
        denom = jnp.maximum(weight_sum, 1.0)
        return loss_sum / denom, (weight_sum, correct / denom)

    def train_step(params, opt_state, batch):
        (loss, (weight_sum, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "supervised_tokens": weight_sum,
            "token_accuracy": accuracy,
            "tokens": jnp.sum(batch["segment_ids"] > 0),
        }
        return params, opt_state, metrics

    params_sharding, opt_sharding = shardings
    return jax.jit(
        train_step,
        in_shardings=(params_sharding, opt_sharding, None),
        out_shardings=(params_sharding, opt_sharding, None),
        donate_argnums=(0, 1),
    )


def make_eval_step(layout: ParamLayout) -> Callable:
    """`eval_step(params, batch) -> (loss_sum, weight_sum, correct)` to be summed over batches."""
    return jax.jit(lambda params, batch: _batch_sums(layout, params, batch))
