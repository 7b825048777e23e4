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
    """Decay matrices, embeddings and LoRA's matrices (as Hugging Face's Trainer does):
    never norm scales or biases (stacked or not)."""
    return {name: name.endswith((".kernel", ".embedding", ".lora_a", ".lora_b")) for name in params}


def build_optimizer(
    spec: TrainSpec, total_steps: int, groups: tuple[tuple[int, tuple[str, ...]], ...] | None = None
) -> optax.GradientTransformation:
    """The run's optimizer over a flat dict of parameters. `groups`: (start step, names)
    of each stage of `workers.training.trainable` started so far: gradients are clipped over all of
    them together, and each stage has an optimizer state of its own that starts at its
    start step, with the schedule's learning rate from there (a layer unfrozen at step
    100 starts with fresh moments and Adam's bias correction, at the run's rate)."""
    schedule = learning_rate_schedule(spec, total_steps)
    if groups is None:
        return _with_clip(spec, _optimizer(spec, schedule))
    stages = [(_optimizer(spec, lambda count, start=start: schedule(count + start)), names) for start, names in groups]
    return _with_clip(spec, _staged(stages))


def _with_clip(spec: TrainSpec, opt: optax.GradientTransformation) -> optax.GradientTransformation:
    if spec.clip_grad:
        return optax.chain(optax.clip_by_global_norm(spec.clip_grad), opt)
    return opt


def _staged(stages: list[tuple[optax.GradientTransformation, tuple[str, ...]]]) -> optax.GradientTransformation:
    """One optimizer per stage, each on its own names of the flat dict; the state is the
    tuple of theirs, so a new stage appends one."""

    def pick(tree, names):
        return None if tree is None else {name: tree[name] for name in names}

    def init(params):
        return tuple(opt.init(pick(params, names)) for opt, names in stages)

    def update(updates, state, params=None):
        out, states = {}, []
        for (opt, names), inner in zip(stages, state):
            stage_updates, inner = opt.update(pick(updates, names), inner, pick(params, names))
            out.update(stage_updates)
            states.append(inner)
        return out, tuple(states)

    return optax.GradientTransformation(init, update)


def _optimizer(spec: TrainSpec, lr: optax.Schedule) -> optax.GradientTransformation:
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
    return opt


def append_stage(spec: TrainSpec, opt_state, stage_state):
    """The state of `build_optimizer(spec, ..., groups + (new,))` from that of `groups`
    and that of `build_optimizer(spec, ..., (new,))`: the earlier stages keep theirs."""
    if spec.clip_grad:  # optax.chain(clip, staged): (clip state, stage states)
        return (opt_state[0], opt_state[1] + stage_state[1])
    return opt_state + stage_state
