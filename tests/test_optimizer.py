"""Schedules against closed-form values, and every optimizer on a real parameter tree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pydantic import ValidationError

import raysft as rs
from raysft.workers.training.optimizer import build_optimizer, decay_mask, learning_rate_schedule
from raysft.workers.spec import TrainSpec


def _spec(**fields) -> TrainSpec:
    return TrainSpec.from_config(rs.SFTConfig(**fields), model="unused")


def _values(spec, total):
    schedule = learning_rate_schedule(spec, total)
    return np.array([float(schedule(s)) for s in range(total)])


def test_warmup_into_cosine_to_learning_rate_end():
    lr, end, warmup, total = 1e-3, 1e-4, 10, 110
    values = _values(_spec(learning_rate=lr, learning_rate_end=end, scheduler=rs.Schedulers.COSINE, warmup_steps=warmup), total)
    expected = [lr * s / warmup for s in range(warmup)] + [
        end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)
    ]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-9)


def test_linear_and_constant_and_warmup_ratio():
    values = _values(_spec(learning_rate=2e-5, learning_rate_end=5e-6, scheduler="linear"), 11)
    np.testing.assert_allclose(values, 2e-5 + (5e-6 - 2e-5) * np.arange(11) / 11, rtol=1e-5)
    assert set(_values(_spec(learning_rate=3e-4, scheduler="none"), 5)) == {3e-4}
    ratio = _values(_spec(learning_rate=1e-3, warmup_ratio=0.25, scheduler="none"), 20)
    np.testing.assert_allclose(ratio[:6], 1e-3 * np.arange(5 + 1)[:6] / 5, rtol=1e-6)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"scheduler": "none", "learning_rate_end": 1e-6}, "learning_rate_end is set but scheduler is 'none'"),
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, "set warmup_steps or warmup_ratio, not both"),
        ({"learning_rate": 1e-5, "learning_rate_end": 1e-4}, "learning_rate_end 0.0001 is above learning_rate"),
        ({"optimizer": "adam"}, "Input should be 'adamw', 'adafactor', 'lion', 'sgd' or 'rmsprop'"),
    ],
)
def test_contradictions_are_config_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        rs.SFTConfig(**fields)


def test_enums_and_strings_are_the_same_setting():
    assert rs.SFTConfig(scheduler=rs.Schedulers.COSINE, optimizer=rs.Optimizers.LION) == rs.SFTConfig(
        scheduler="cosine", optimizer="lion"
    )


@pytest.mark.parametrize("optimizer", [o.value for o in rs.Optimizers])
def test_every_optimizer_steps_and_spares_norms_from_decay(optimizer):
    params = {
        "model.layers.self_attn.q_proj.kernel": jnp.ones((2, 4, 4)),  # stacked [L, in, out]
        "model.layers.input_layernorm.weight": jnp.ones((2, 4)),  # stacked norm: 2-D, no decay
        "model.layers.self_attn.q_proj.bias": jnp.ones((2, 4)),
    }
    assert decay_mask(params) == {
        "model.layers.self_attn.q_proj.kernel": True,
        "model.layers.input_layernorm.weight": False,
        "model.layers.self_attn.q_proj.bias": False,
    }
    opt = build_optimizer(_spec(optimizer=optimizer, learning_rate=0.1, weight_decay=0.5, clip_grad=None), 10)
    state = opt.init(params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero_grads, state, params)
    # With zero gradients only weight decay moves a parameter, and only the kernel.
    assert float(jnp.abs(updates["model.layers.self_attn.q_proj.kernel"]).max()) > 0
    assert float(jnp.abs(updates["model.layers.input_layernorm.weight"]).max()) == 0
    assert float(jnp.abs(updates["model.layers.self_attn.q_proj.bias"]).max()) == 0


@pytest.mark.parametrize("optimizer", [o.value for o in rs.Optimizers])
def test_every_optimizer_descends_along_the_gradient(optimizer):
    """Without decay, each optimizer's first update moves every parameter against its
    gradient (a sign or scale bug would leave the decay check above passing)."""
    rng = np.random.default_rng(0)
    params = {"w.kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
    grads = {"w.kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
    opt = build_optimizer(_spec(optimizer=optimizer, learning_rate=0.1, weight_decay=0.0, clip_grad=None), 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    u, g = np.asarray(updates["w.kernel"]), np.asarray(grads["w.kernel"])
    assert np.all(u * g < 0), optimizer  # elementwise against the gradient
    assert np.abs(u).max() > 0


def test_clip_grad_scales_to_the_limit_and_keeps_the_direction():
    grads = {"a.kernel": jnp.full((3, 3), 4.0), "b.kernel": jnp.full((2,), -3.0)}  # global norm sqrt(9*16+2*9)
    norm = math.sqrt(9 * 16 + 2 * 9)
    # SGD with learning rate 1: the update is minus the (clipped) gradient.
    for limit, expected in ((1.0, 1.0), (100.0, norm)):
        opt = build_optimizer(_spec(optimizer="sgd", learning_rate=1.0, weight_decay=0.0, clip_grad=limit), 10)
        updates, _ = opt.update(grads, opt.init(grads), grads)
        flat = np.concatenate([np.asarray(updates[k]).ravel() for k in sorted(grads)])
        original = np.concatenate([np.asarray(grads[k]).ravel() for k in sorted(grads)])
        assert np.linalg.norm(flat) == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(-flat / np.linalg.norm(flat), original / norm, rtol=1e-5)
