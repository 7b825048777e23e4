"""optax optimizer and learning-rate schedule from the run's settings."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from raysft.workers.spec import TrainSpec


def warmup_steps(spec: TrainSpec, total_steps: int) -> int:
    if spec.warmup_ratio is not None:
        return math.ceil(spec.warmup_ratio * total_steps)
    return spec.warmup_steps


def learning_rate_schedule(spec: TrainSpec, total_steps: int) -> optax.Schedule:
    """Learning rate before optimizer step `s` (0-based), as Hugging Face schedules it:
    linear warmup from 0 over the warmup steps, then constant, linear or cosine from
    `learning_rate` to `learning_rate_end` (default 0) at the last step."""
    peak = spec.learning_rate
    end = 0.0 if spec.learning_rate_end is None else spec.learning_rate_end
    warmup = warmup_steps(spec, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if spec.scheduler == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    elif spec.scheduler == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params: dict) -> dict:
    """Decay matrices and embeddings only: never norm scales or biases (stacked or not)."""
    return {name: name.endswith((".kernel", ".embedding")) for name in params}


def build_optimizer(spec: TrainSpec, total_steps: int) -> optax.GradientTransformation:
    lr = learning_rate_schedule(spec, total_steps)
    wd = spec.weight_decay
    if spec.optimizer == "adamw":
        # First moments in fp32 whatever the parameter dtype.
        opt = optax.adamw(lr, weight_decay=wd, mask=decay_mask, mu_dtype=jnp.float32)
    elif spec.optimizer == "lion":
        opt = optax.lion(lr, weight_decay=wd, mask=decay_mask, mu_dtype=jnp.float32)
    elif spec.optimizer == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    else:  # sgd, rmsprop: decoupled decay scaled by the learning rate, as AdamW does
        scale = optax.scale_by_rms() if spec.optimizer == "rmsprop" else optax.identity()
        opt = optax.chain(scale, optax.add_decayed_weights(wd, decay_mask), optax.scale_by_learning_rate(lr))
    if spec.clip_grad:
        return optax.chain(optax.clip_by_global_norm(spec.clip_grad), opt)
    return opt
