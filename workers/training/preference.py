"""Preference objectives (DPO and its loss types, ORPO, SimPO) on rows of paired sequences.

A preference row holds pairs side by side as segments: the chosen sequence (prompt and
chosen completion) of a pair is an odd segment 2j+1 of its row and the rejected one the
even segment 2j+2 after it, each with its own positions, so packed pairs never attend to
each other. `loss_weights` mark the completions' tokens. A sequence's log-probability is
the sum of its completion tokens' log-probabilities; `reference_logps` (a row field, the
reference model's log-probability of each token, computed once before training) gives the
reference's. Losses and metrics are TRL's `DPOTrainer`'s (and `CPOTrainer`'s for SimPO,
`ORPOTrainer`'s for ORPO): the loss is the mean over the global batch's pairs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from raysft.workers.training.loss import target_log_probs
from raysft.workers.training.objective import model_outputs, with_router_terms

DPO_LOSSES = ("sigmoid", "hinge", "ipo")
LOSS_TYPES = (*DPO_LOSSES, "simpo", "orpo")
REFERENCE_FIELD = "reference_logps"
# What a preference step reports besides the loss (TRL's names).
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "pairs")

_PAIR_SUMS = ("pair_loss_sum", "pairs", "reward_chosen_sum", "reward_rejected_sum", "reward_correct",
              "logps_chosen_sum", "logps_rejected_sum", "nll_sum", "chosen_sequence_tokens", "chosen_tokens",
              "chosen_correct")


@dataclasses.dataclass(frozen=True)
class PreferenceSettings:
    """`loss_type`: one of LOSS_TYPES. `beta`: DPO's β (IPO's τ; SimPO's and ORPO's β,
    ORPO's λ). `label_smoothing`: cDPO's flip probability (sigmoid and SimPO).
    `simpo_gamma`: SimPO's target margin γ. `reference_free`: DPO against a uniform
    reference (log-probabilities 0); SimPO and ORPO never use a reference."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference_free: bool = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.beta <= 0:
            raise ValueError(f"beta {self.beta} must be positive")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in DPO_LOSSES and not self.reference_free


def _shifted(x_BxT):
    """The value of token t+1 at position t (what position t predicts), 0 at the end."""
    return jnp.pad(x_BxT[:, 1:], ((0, 0), (0, 1)))


def sequence_sums(values_BxT, segment_ids_BxT):
    """Sums of `values` (already 0 off the completions) per segment of each row: (chosen,
    rejected), each [B, T // 2], pair j of a row at index j."""
    t = values_BxT.shape[1]
    per_segment = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=t + 2))(values_BxT, segment_ids_BxT)
    return per_segment[:, 1 : t + 1 : 2], per_segment[:, 2 : t + 2 : 2]


def in_chosen_sequences(segment_ids_BxT):
    """Positions that predict a token of a chosen sequence (prompt or completion): the next
    token is in the same segment, an odd one."""
    following = _shifted(segment_ids_BxT)
    return (following % 2 == 1) & (following == segment_ids_BxT)


def pair_counts(batch) -> dict:
    """The pairs of a batch, and the tokens its chosen sequences predict (its rows only, no model)."""
    weights = batch["loss_weights"].astype(jnp.float32)
    chosen_len, rejected_len = sequence_sums(weights, batch["segment_ids"])
    return {"total_pairs": jnp.maximum(jnp.sum((chosen_len > 0) & (rejected_len > 0)), 1).astype(jnp.float32),
            "total_chosen_sequence_tokens": jnp.maximum(jnp.sum(in_chosen_sequences(batch["segment_ids"])), 1
                                                        ).astype(jnp.float32)}


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _smoothed_sigmoid(logits, label_smoothing):
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


def pair_losses(s: PreferenceSettings, chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
    """(per-pair loss, chosen reward, rejected reward), as TRL computes them."""
    chosen_avg, rejected_avg = chosen / jnp.maximum(chosen_len, 1.0), rejected / jnp.maximum(rejected_len, 1.0)
    if s.loss_type == "simpo":
        return (_smoothed_sigmoid(s.beta * (chosen_avg - rejected_avg) - s.simpo_gamma, s.label_smoothing),
                s.beta * chosen_avg, s.beta * rejected_avg)
    if s.loss_type == "orpo":
        log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
        return -s.beta * jax.nn.log_sigmoid(log_odds), s.beta * chosen_avg, s.beta * rejected_avg
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if s.loss_type == "sigmoid":
        loss = _smoothed_sigmoid(s.beta * delta, s.label_smoothing)
    elif s.loss_type == "hinge":
        loss = jax.nn.relu(1 - s.beta * delta)
    else:  # ipo: per-token averages, as TRL (and IPO's authors) normalise it
        ipo_delta = chosen_ratio / jnp.maximum(chosen_len, 1.0) - rejected_ratio / jnp.maximum(rejected_len, 1.0)
        loss = jnp.square(ipo_delta - 1 / (2 * s.beta))
    return loss, s.beta * chosen_ratio, s.beta * rejected_ratio


@dataclasses.dataclass(frozen=True)
class Preference:
    """The preference objective (see the module); `router` as `objective.SFT`'s."""

    settings: PreferenceSettings
    loss_chunk_size: int | None = None
    router: tuple[float, float] = (0.0, 0.0)
    eval_keys = _PAIR_SUMS

    @property
    def fields(self) -> dict:
        return {REFERENCE_FIELD: np.float32} if self.settings.needs_reference else {}

    def totals(self, batch) -> dict:
        return pair_counts(batch)

    def token_log_probs(self, model, batch, dropout_key=None):
        """(log-probability of each next token, whether it is the model's top token,
        routing sums), [B, T] at the position that predicts the token."""
        hidden, head, shards, routing = model_outputs(model, batch, dropout_key)
        log_probs, top = target_log_probs(hidden, head, batch["input_ids"], self.loss_chunk_size, shards)
        return log_probs, top, routing

    def reference_log_probs(self, model, batch):
        """The row field `reference_logps`: each completion token's log-probability at the
        token's own position (0 elsewhere), as the model in `model` gives it."""
        log_probs, _, _ = self.token_log_probs(model, batch)
        completion = jnp.where(_shifted(batch["loss_weights"]) > 0, log_probs, 0.0)
        return jnp.pad(completion[:, :-1], ((0, 0), (1, 0)))

    def sums(self, model, batch, totals, dropout_key=None, accumulation: int = 1) -> dict:
        s = self.settings
        log_probs, top, routing = self.token_log_probs(model, batch, dropout_key)
        segments = _shifted(batch["segment_ids"])
        weights = _shifted(batch["loss_weights"]).astype(jnp.float32)
        chosen, rejected = sequence_sums(jnp.where(weights > 0, log_probs, 0.0), segments)
        chosen_len, rejected_len = sequence_sums(weights, segments)
        if s.needs_reference:
            ref_chosen, ref_rejected = sequence_sums(_shifted(batch[REFERENCE_FIELD]) * (weights > 0), segments)
        else:
            ref_chosen = ref_rejected = jnp.zeros_like(chosen)
        loss, reward_chosen, reward_rejected = pair_losses(s, chosen, rejected, ref_chosen, ref_rejected,
                                                           chosen_len, rejected_len)
        real = (chosen_len > 0) & (rejected_len > 0)
        pair_sum = lambda x: jnp.sum(jnp.where(real, x, 0.0))  # noqa: E731
        is_chosen = (segments % 2 == 1) & (weights > 0)
        # ORPO's SFT term, as TRL's ORPOTrainer takes it: the mean token loss over the chosen
        # sequences, prompt included.
        in_chosen = in_chosen_sequences(batch["segment_ids"])
        nll_sum = -jnp.sum(jnp.where(in_chosen, log_probs, 0.0))
        objective = pair_sum(loss) / totals["total_pairs"]
        if s.loss_type == "orpo":
            objective = objective + nll_sum / totals["total_chosen_sequence_tokens"]
        sums = {
            "objective": objective,
            **jax.lax.stop_gradient({
                "pair_loss_sum": pair_sum(loss), "pairs": jnp.sum(real).astype(jnp.float32),
                "reward_chosen_sum": pair_sum(reward_chosen), "reward_rejected_sum": pair_sum(reward_rejected),
                "reward_correct": pair_sum((reward_chosen > reward_rejected).astype(jnp.float32)),
                "logps_chosen_sum": pair_sum(chosen), "logps_rejected_sum": pair_sum(rejected),
                "nll_sum": nll_sum, "chosen_sequence_tokens": jnp.sum(in_chosen).astype(jnp.float32),
                "chosen_tokens": jnp.sum(jnp.where(is_chosen, weights, 0.0)),
                "chosen_correct": jnp.sum(top & is_chosen).astype(jnp.float32),
            }),
        }
        return with_router_terms(sums, routing, *self.router, 1.0 / accumulation)

    def denominator(self, sums):
        return jnp.ones((), jnp.float32)  # each micro-batch's objective is already its share of the mean

    def metrics(self, sums) -> dict:
        return _metrics(sums, self.settings.loss_type, jnp.maximum)

    def eval_metrics(self, sums) -> dict[str, float]:
        return {k: float(v) for k, v in _metrics({k: float(v) for k, v in sums.items()}, self.settings.loss_type,
                                                  max).items()}


def _metrics(sums, loss_type: str, maximum) -> dict:
    """TRL's names: `loss`, `rewards/{chosen,rejected,accuracies,margins}`,
    `logps/{chosen,rejected}`, and the chosen completions' `token_accuracy`."""
    pairs, tokens = maximum(sums["pairs"], 1.0), maximum(sums["chosen_tokens"], 1.0)
    loss = sums["pair_loss_sum"] / pairs
    if loss_type == "orpo":
        loss = loss + sums["nll_sum"] / maximum(sums["chosen_sequence_tokens"], 1.0)
    return {
        "loss": loss, "rewards/chosen": sums["reward_chosen_sum"] / pairs,
        "rewards/rejected": sums["reward_rejected_sum"] / pairs, "rewards/accuracies": sums["reward_correct"] / pairs,
        "rewards/margins": (sums["reward_chosen_sum"] - sums["reward_rejected_sum"]) / pairs,
        "logps/chosen": sums["logps_chosen_sum"] / pairs, "logps/rejected": sums["logps_rejected_sum"] / pairs,
        "token_accuracy": sums["chosen_correct"] / tokens, "supervised_tokens": sums["chosen_tokens"], "pairs": sums["pairs"],
    }
