"""Pure jitted steps: (params, optimizer state, batch) in, new state and metrics out."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from raysft.workers.loss import token_loss_sums
from raysft.workers.models.params import ParamLayout


def batch_sums(layout: ParamLayout, params, batch, chunk_size: int | None = None) -> dict[str, jax.Array]:
    model = layout.bind(params)
    hidden_BxTxD = model.hidden_states(batch["input_ids"], batch["segment_ids"], batch["positions"])
    return token_loss_sums(hidden_BxTxD, model.logits, batch["input_ids"], batch["loss_weights"], chunk_size)


def make_train_step(
    layout: ParamLayout,
    optimizer: optax.GradientTransformation,
    shardings,
    loss_chunk_size: int | None = None,
    z_loss: float = 0.0,
) -> Callable:
    """`train_step(params, opt_state, batch) -> (params, opt_state, metrics)`.

    The loss is normalised by the supervised tokens of the whole global batch (the jitted
    sums run over every host's rows), so it does not depend on how rows are split.
    `z_loss` adds z_loss * mean(log Z^2) over supervised tokens (PaLM's logit drift guard).
    """

    def loss_fn(params, batch):
        sums = batch_sums(layout, params, batch, loss_chunk_size)
        denom = jnp.maximum(sums["weight_sum"], 1.0)
        loss = sums["loss_sum"] / denom
        return loss + z_loss * sums["z_sum"] / denom, (loss, sums, denom)

    def train_step(params, opt_state, batch):
        (_, (loss, sums, denom)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "supervised_tokens": sums["weight_sum"],
            "token_accuracy": sums["correct"] / denom,
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


def make_eval_step(layout: ParamLayout, loss_chunk_size: int | None = None) -> Callable:
    """`eval_step(params, batch) -> sums` (loss_sum, weight_sum, correct, ...) to add over batches."""
    return jax.jit(lambda params, batch: batch_sums(layout, params, batch, loss_chunk_size))
