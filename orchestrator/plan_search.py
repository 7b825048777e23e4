"""The changes `raysft plan` tries when a run does not fit: smallest first.

A change is a set of SFTConfig updates along four memory levers: a stronger remat
policy, more micro-batches, more tensor parallelism (fsdp/tp split), bf16 parameters.
Each lever's step has a cost (what it takes from speed or precision); candidates are
tried in order of total cost, and one that is no stronger on any monotone lever than a
candidate that already failed is skipped without compiling.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

# From most memory to least: what each policy keeps for the backward pass.
REMAT_ORDER = ("none", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")
# The steps a search takes: policies that keep less than the one before by a real margin.
REMAT_STEPS = ("dots_with_no_batch_dims_saveable", "nothing_saveable")


@dataclasses.dataclass(frozen=True)
class Change:
    updates: tuple[tuple[str, Any], ...]  # (SFTConfig field, value), in flag order
    cost: int
    levels: tuple[int, int, int, int]  # remat, accumulation, tp, dtype steps from the start

    def describe(self) -> str:
        return " ".join(f"--{name} {_flag(value)}" for name, value in self.updates)

    def weaker_or_equal(self, other: "Change") -> bool:
        """No stronger than `other` on any lever that only ever saves memory (remat,
        micro-batches, dtype) and the same tp (more tp can cost activation memory)."""
        mine, theirs = self.levels, other.levels
        return mine[2] == theirs[2] and all(mine[i] <= theirs[i] for i in (0, 1, 3))


def _flag(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def candidate_changes(config, data_devices: int, devices: int, kv_heads: int) -> list[Change]:
    """Every combination of lever steps valid for this run, cheapest first.

    `data_devices`: dp x fsdp of the run's mesh; `devices`: of one slice; `kv_heads`:
    what tp must divide."""
    policy = "nothing_saveable" if config.gradient_checkpointing == "full" else config.gradient_checkpointing
    at = REMAT_ORDER.index(policy)
    remats = [policy] + [p for p in REMAT_STEPS if REMAT_ORDER.index(p) > at]
    dp, fsdp, tp, sp = config.sharding_axis_dims
    accumulations = [config.gradient_accumulation_steps * 2**k for k in range(0, 6)]
    tps = [tp * 2**k for k in range(0, 4) if kv_heads % (tp * 2**k) == 0 and devices % (tp * 2**k * sp * max(dp, 1)) == 0]
    dtypes = ["float32", "bfloat16"] if config.param_dtype == "float32" else [config.param_dtype]
    out = []
    for (r, remat), (a, accumulation), (t, new_tp), (d, dtype) in itertools.product(
        enumerate(remats), enumerate(accumulations), enumerate(tps), enumerate(dtypes)
    ):
        if not (r or a or t or d):
            continue
        rows_per_shard = config.total_batch_size * new_tp // (tp * data_devices)  # fsdp shrinks as tp grows
        if config.total_batch_size % (data_devices * tp // new_tp * accumulation) or rows_per_shard < accumulation:
            continue
        updates = []
        if r:
            updates.append(("gradient_checkpointing", remat))
        if a:
            updates.append(("gradient_accumulation_steps", accumulation))
        if t:
            updates.append(("sharding_axis_dims", (dp, -1, new_tp, sp)))
        if d:
            updates.append(("param_dtype", dtype))
        out.append(Change(tuple(updates), r + a + 2 * t + 3 * d, (r, a, t, d)))
    return sorted(out, key=lambda c: (c.cost, len(c.updates), c.levels))


def strongest(changes: list[Change]) -> list[Change]:
    """For each tp, the change that saves the most on every monotone lever: if none of
    these fits, nothing does."""
    best: dict[int, Change] = {}
    for change in changes:
        tp_level = change.levels[2]
        if tp_level not in best or all(change.levels[i] >= best[tp_level].levels[i] for i in (0, 1, 3)):
            best[tp_level] = change
    return [best[k] for k in sorted(best)]
