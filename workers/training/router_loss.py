"""A mixture-of-experts model's routing terms: transformers' load-balancing loss, the
router z-loss and each expert's share of the assignments, from the per-layer routing sums
the model returns (`workers.models.experts.routing_sums`), over real tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# What a mixture-of-experts model's step reports besides the loss.
ROUTING_METRICS = ("aux_loss", "router_z_loss", "expert_load_min", "expert_load_max", "expert_dropped_fraction")


def router_terms(routing: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`aux_loss`: transformers' `load_balancing_loss_func`, E * sum_e f_e * P_e, with the
    fraction of assignments f and the mean router probability P of each expert pooled over
    every sparse layer's real tokens. `router_z_loss`: the mean over layers and tokens of
    logsumexp(router logits)^2. `expert_assigned` [layers, E]: the assignments per expert
    (of real tokens). Under a capacity factor, the assignments it dropped (`expert_dropped`)
    of those made (`expert_assignments`)."""
    tokens = jnp.maximum(jnp.sum(routing["tokens"]), 1.0)
    assigned_LxE, probability_LxE = routing["assigned"], routing["probability"]
    fraction_E = jnp.sum(assigned_LxE, axis=0) / tokens
    probability_E = jnp.sum(probability_LxE, axis=0) / tokens
    terms = {
        "aux_loss": assigned_LxE.shape[-1] * jnp.sum(fraction_E * probability_E),
        "router_z_loss": jnp.sum(routing["z"]) / tokens,
        "expert_assigned": assigned_LxE,
    }
    if "dropped" in routing:  # a capacity factor's overflow, and every assignment made (real tokens')
        terms["expert_dropped"] = jnp.sum(routing["dropped"])
        terms["expert_assignments"] = jnp.sum(assigned_LxE)
    return terms


def expert_load(assigned_LxE: jax.Array) -> dict[str, jax.Array]:
    """The smallest and largest share of a layer's assignments that one expert took
    (1 / E each when balanced; a collapsing router drives the max towards k / E... 1)."""
    share_LxE = assigned_LxE / jnp.maximum(jnp.sum(assigned_LxE, axis=-1, keepdims=True), 1.0)
    return {"expert_load_min": jnp.min(share_LxE), "expert_load_max": jnp.max(share_LxE)}
