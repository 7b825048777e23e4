"""optax optimizer and learning-rate schedule from the run's settings."""

from __future__ import annotations

import jax
import optax

from raysft.workers.spec import TrainSpec


def learning_rate_schedule(spec: TrainSpec, total_steps: int) -> optax.Schedule:
    """Learning rate at each optimizer step: warmup from 0, then constant or linear."""
    peak = spec.learning_rate
    decay_steps = max(total_steps - spec.warmup_steps, 1)
    if spec.scheduler == "linear":
        end = 0.0 if spec.learning_rate_end is None else spec.learning_rate_end
        main = optax.linear_schedule(peak, end, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if spec.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, spec.warmup_steps)
    return optax.join_schedules([warmup, main], [spec.warmup_steps])


def _decay_mask(params):
    # Norm scales (and biases) are 1-D; decaying them towards 0 only hurts.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(spec: TrainSpec, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate_schedule(spec, total_steps), weight_decay=spec.weight_decay, mask=_decay_mask
    )
    if spec.clip_grad:
        return optax.chain(optax.clip_by_global_norm(spec.clip_grad), adamw)
    return adamw
