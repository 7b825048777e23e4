"""What a training run optimises: an objective turns a batch of rows into the sums its loss,
gradient and metrics come from. The jitted step, the micro-batch scan, eval, checkpoints and
restarts are the same for every objective (`workers.training.step`).

An objective says which fields its rows hold beyond the shared ones (`fields`), what it
counts over the whole global batch before the micro-batch scan (`totals`: the normalisers
a micro-batch's share of the loss needs), a micro-batch's sums (`sums`: `objective`, the one
that carries a gradient, and the statistics its metrics need), what the summed gradient is
divided by once the scan is done (`denominator`), and how sums become the metrics a step
line (`metrics`, of the sums and totals together) and an eval line (`eval_metrics`) report."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from raysft.workers.training.loss import token_loss_sums
from raysft.workers.training.router_loss import router_terms


class Objective(Protocol):
    fields: dict[str, Any]
    eval_keys: tuple[str, ...]

    def totals(self, batch) -> dict: ...

    def sums(self, model, batch, totals: dict, dropout_key=None, accumulation: int = 1) -> dict: ...

    def denominator(self, sums: dict): ...

    def metrics(self, sums: dict) -> dict: ...

    def eval_metrics(self, sums: dict) -> dict[str, float]: ...


def model_outputs(model, batch, dropout_key=None):
    """(hidden states, the model's head, sequence shards, routing sums or None)."""
    hidden_BxTxD, routing = model.hidden_states_and_routing(
        batch["input_ids"], batch["segment_ids"], batch["positions"], dropout_key
    )
    mesh = model.runtime.mesh
    return hidden_BxTxD, model.logits, mesh.shape["sp"] if mesh is not None else 1, routing


def with_router_terms(sums: dict, routing, aux: float, z: float, scale) -> dict:
    """A mixture-of-experts model's routing terms join `objective`, weighted by (aux, z) and
    multiplied by `scale` (what one unit of the mean loss is in the objective's sums)."""
    if routing is None:
        return sums
    terms = router_terms(routing)
    penalty = aux * terms["aux_loss"] + z * terms["router_z_loss"]
    return {**sums, "objective": sums["objective"] + scale * penalty, **jax.lax.stop_gradient(terms)}


@dataclasses.dataclass(frozen=True)
class SFT:
    """Next-token cross-entropy over the rows' weighted tokens: the loss is the sum of
    weighted token losses over the global batch divided once by the sum of their weights,
    so neither accumulation nor the number of hosts changes it. `z_loss` adds
    z_loss * mean(log Z^2) over supervised tokens; a mixture-of-experts model adds
    `router` = (aux, z) times its routing terms, each the mean over micro-batches."""

    loss_chunk_size: int | None = None
    z_loss: float = 0.0
    router: tuple[float, float] = (0.0, 0.0)
    fields = {}
    eval_keys = ("loss_sum", "weight_sum", "correct")

    def totals(self, batch) -> dict:
        return {"supervised": jnp.maximum(jnp.sum(batch["loss_weights"][:, 1:].astype(jnp.float32)), 1.0)}

    def sums(self, model, batch, totals, dropout_key=None, accumulation: int = 1) -> dict:
        hidden, head, shards, routing = model_outputs(model, batch, dropout_key)
        sums = token_loss_sums(hidden, head, batch["input_ids"], batch["loss_weights"], self.loss_chunk_size, shards,
                               self.z_loss)
        return with_router_terms(sums, routing, *self.router, totals["supervised"] / accumulation)

    def denominator(self, sums):
        return jnp.maximum(sums["weight_sum"], 1.0)

    def metrics(self, sums) -> dict:
        denom = self.denominator(sums)
        return {"loss": sums["loss_sum"] / denom, "supervised_tokens": sums["weight_sum"],
                "token_accuracy": sums["correct"] / denom}

    def eval_metrics(self, sums) -> dict[str, float]:
        loss = float(sums["loss_sum"]) / max(float(sums["weight_sum"]), 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                "token_accuracy": float(sums["correct"]) / max(float(sums["weight_sum"]), 1.0)}


def sft_from(loss_chunk_size=None, z_loss=0.0, router=(0.0, 0.0), objective: Objective | None = None) -> Objective:
    return objective if objective is not None else SFT(loss_chunk_size, z_loss, tuple(router))

