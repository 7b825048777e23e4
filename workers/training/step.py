"""Pure jitted steps: (params, optimizer state, batch) in, new state and metrics out."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from raysft.workers.models.lora import child_key
from raysft.workers.models.params import ParamLayout
from raysft.workers.training.flops import attention_pairs
from raysft.workers.training.objective import SFT, Objective, sft_from
from raysft.workers.training.router_loss import expert_load


class RouterWeights(NamedTuple):
    """The routing terms' weights in the objective, and `scale`, what a term of the mean
    loss is multiplied by to join the objective's sum over tokens (the batch's supervised
    tokens over its micro-batches), so the trained loss is mean CE + aux * aux_loss + ...."""

    aux: float = 0.0
    z: float = 0.0
    scale: Any = 1.0


def batch_sums(
    layout: ParamLayout, params, batch, chunk_size: int | None = None, dropout_key=None, z_loss: float = 0.0,
    router: RouterWeights = RouterWeights(),
) -> dict[str, jax.Array]:
    """The SFT objective's sums of one batch (`token_loss_sums`, and a mixture-of-experts
    model's routing terms weighted by `router`)."""
    objective = SFT(chunk_size, z_loss, (router.aux, router.z))
    return objective.sums(layout.bind(params), batch, {"supervised": router.scale}, dropout_key)


def accumulate(fn: Callable, steps: int, batch_sharding=None) -> Callable:
    """`fn(params, batch, index)` summed over `steps` micro-batches of `batch` (`index`
    0, 1, ...) in a `lax.scan`, so only one micro-batch's activations are live at a time."""
    if steps == 1:
        return lambda params, batch: fn(params, batch, 0)

    def summed(params, batch):
        micro = microbatches(batch, steps, batch_sharding)
        zero = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micro), 0)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)

        def one(carry, xs):
            micro_batch, index = xs
            return jax.tree.map(jnp.add, carry, fn(params, micro_batch, index)), None

        return jax.lax.scan(one, zero, (micro, jnp.arange(steps)))[0]

    return summed


def microbatches(batch: dict[str, jax.Array], steps: int, batch_sharding=None) -> dict[str, jax.Array]:
    """[B, T] -> [steps, B / steps, T], micro-batch k holding rows k, k + steps, ... so each
    device's contiguous block of rows contributes equally to every micro-batch."""

    def split(x):
        b = x.shape[0]
        out = x.reshape(b // steps, steps, *x.shape[1:]).swapaxes(0, 1)
        if batch_sharding is not None:
            spec = jax.sharding.PartitionSpec(None, *batch_sharding.spec)
            out = jax.lax.with_sharding_constraint(out, jax.sharding.NamedSharding(batch_sharding.mesh, spec))
        return out

    return {name: split(x) for name, x in batch.items()}


def make_gradient_fn(
    layout: ParamLayout,
    loss_chunk_size: int | None = None,
    z_loss: float = 0.0,
    gradient_accumulation_steps: int = 1,
    batch_sharding=None,
    router: tuple[float, float] = (0.0, 0.0),
    objective: Objective | None = None,
) -> Callable:
    """`gradient(params, batch, frozen, dropout_key) -> (grads, sums)`: the
    gradient of the global-batch loss of `objective` (default: SFT with `loss_chunk_size`,
    `z_loss` and `router`, see `objective.SFT`) with respect to `params`; `frozen` (the
    rest of the model's parameters, by name) enters the model but is not differentiated.

    The objective's `totals` are taken over the whole global batch, its micro-batches' sums
    are added in a `lax.scan` (`sums` holds both), and the summed gradient is divided once by its
    `denominator`, so neither accumulation nor the number of hosts changes the loss."""
    objective = sft_from(loss_chunk_size, z_loss, router, objective)
    steps = gradient_accumulation_steps

    def gradient(params, batch, frozen=None, dropout_key=None):
        totals = objective.totals(batch)

        def objective_sums(trained, micro_batch, index):
            model = layout.bind({**(frozen or {}), **trained})
            sums = objective.sums(model, micro_batch, totals, child_key(dropout_key, index), steps)
            return sums["objective"], sums

        sum_grads = accumulate(jax.grad(objective_sums, has_aux=True), steps, batch_sharding)
        grad_sums, sums = sum_grads(params, batch)
        denom = objective.denominator(sums)
        return jax.tree.map(lambda g: g / denom.astype(g.dtype), grad_sums), {**sums, **totals}

    return gradient


def make_train_step(
    layout: ParamLayout,
    optimizer: optax.GradientTransformation,
    shardings,
    loss_chunk_size: int | None = None,
    z_loss: float = 0.0,
    gradient_accumulation_steps: int = 1,
    batch_sharding=None,
    frozen_sharding=None,
    dropout_seed: int | None = None,
    router: tuple[float, float] = (0.0, 0.0),
    objective: Objective | None = None,
) -> Callable:
    """`train_step(params, opt_state, batch, frozen, step) -> (params, opt_state, metrics)`,
    one jitted step: gradient (see `make_gradient_fn`) of the trained `params`, optimizer
    update, metrics left on device. `frozen`: the model's other parameters ({} when all
    train). With `dropout_seed`, LoRA dropout draws from (seed, `step`). A mixture-of-experts
    model's metrics add its routing terms and the least and most loaded expert's share."""
    objective = sft_from(loss_chunk_size, z_loss, router, objective)
    gradient = make_gradient_fn(layout, gradient_accumulation_steps=gradient_accumulation_steps,
                                batch_sharding=batch_sharding, objective=objective)

    def train_step(params, opt_state, batch, frozen, step):
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.PRNGKey(dropout_seed), step)
        grads, sums = gradient(params, batch, frozen, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        real_tokens = jnp.sum(batch["segment_ids"] > 0)
        metrics = {
            **objective.metrics(sums),
            "grad_norm": optax.global_norm(grads),
            "tokens": real_tokens,
            # for the model FLOPs of packed rows
            "attention_pairs": attention_pairs(batch["segment_ids"], layout.attention_windows),
            "padding_fraction": 1.0 - real_tokens / batch["segment_ids"].size,
        }
        if "aux_loss" in sums:
            steps = gradient_accumulation_steps
            metrics.update(
                aux_loss=sums["aux_loss"] / steps, router_z_loss=sums["router_z_loss"] / steps,
                **expert_load(sums["expert_assigned"]),
            )
            if "expert_dropped" in sums:
                metrics["expert_dropped_fraction"] = sums["expert_dropped"] / jnp.maximum(sums["expert_assignments"], 1.0)
        return params, opt_state, metrics

    params_sharding, opt_sharding = shardings
    return jax.jit(
        train_step,
        in_shardings=(params_sharding, opt_sharding, None, frozen_sharding, None),
        out_shardings=(params_sharding, opt_sharding, None),
        donate_argnums=(0, 1),
    )


def make_eval_step(
    layout: ParamLayout,
    loss_chunk_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    batch_sharding=None,
    params_sharding=None,
    objective: Objective | None = None,
) -> Callable:
    """`eval_step(params, batch) -> sums` (the objective's `eval_keys`) to add over
    batches; in training's micro-batches, so eval never holds more activations than a step.
    It reports the objective's own statistics (SFT: the loss without z-loss)."""
    objective = sft_from(loss_chunk_size, objective=objective)

    def reported_sums(params, batch, _):
        sums = objective.sums(layout.bind(params), batch, objective.totals(batch))
        return {key: sums[key] for key in objective.eval_keys}

    sums = accumulate(reported_sums, gradient_accumulation_steps, batch_sharding)
    return jax.jit(sums, in_shardings=(params_sharding, batch_sharding))
