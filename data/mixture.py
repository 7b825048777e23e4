"""Several datasets as one training set: which documents of each source it takes.

Sources come as a dict (`{"name": source}`, `{"name": {"path": source, "weight": 0.3}}`,
`{"name": (source, 0.3)}`) or a list (sources, or `(source, weight)` pairs). Without
weights every document of every source is taken once. With weights the mixture is made
by trained-token budget, the tokens that carry loss, so each source's share of the
gradient is its weight: source k gets `w_k * B` trained tokens, with B the largest
budget no source runs out of (`first_exhausted`, nothing repeated) or the smallest that
uses all of every source (`all_exhausted`, smaller sources repeated). Each source's
documents are taken in an order drawn from `(seed, source index)`, whole documents until
its budget is reached, so the same seed always gives the same mixture.
"""

from __future__ import annotations

import dataclasses
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from raysft.storage.errors import DataError

STOPPING = ("first_exhausted", "all_exhausted")


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    source: Any
    weight: float | None


def is_mixture(dataset: Any) -> bool:
    return isinstance(dataset, (dict, list, tuple))


def parts(dataset: Any, what: str = "train_dataset") -> list[Part]:
    """The named sources of a dict or list; one unnamed part for a single source."""
    if not is_mixture(dataset):
        return [Part("", dataset, None)]
    if isinstance(dataset, dict):
        found = [_part(str(name), value, what) for name, value in dataset.items()]
    else:
        found = [_part(None, value, what) for value in dataset]
    if not found:
        raise DataError(f"{what}: an empty mixture; give at least one source")
    names = [p.name for p in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{what}: source name {repeated[0]!r} repeated; name each source once (a dict names them)")
    weighted = [p.weight is not None for p in found]
    if any(weighted) and not all(weighted):
        unweighted = next(p.name for p in found if p.weight is None)
        raise DataError(f"{what}: source {unweighted!r} has no weight; give every source a weight or none")
    return found


def _part(name: str | None, value: Any, what: str) -> Part:
    weight = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "weight"})
        if unknown or "path" not in value:
            raise DataError(f"{what}: source {name!r} must be {{'path': ..., 'weight': ...}}; got keys {sorted(value)}")
        value, weight = value["path"], value.get("weight")
    elif isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], Real):  # JSON/YAML: a list
        value, weight = value
    if weight is not None:
        if not isinstance(weight, Real) or isinstance(weight, bool) or not weight > 0:
            raise DataError(f"{what}: source {name or _name(value)!r} has weight {weight!r}; weights must be > 0")
        weight = float(weight)
    return Part(name if name is not None else _name(value), value, weight)


def _name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return Path(str(source).rstrip("/")).stem or str(source)
    return type(source).__name__


def select(trained: list[np.ndarray], weights: list[float] | None, seed: int, stopping: str) -> list[np.ndarray]:
    """Per source, the indices of its documents in the mixture, in the order taken (an
    index appears again each time a source is repeated). `trained`: each document's
    trained tokens, per source."""
    if weights is None:
        return [np.arange(len(t)) for t in trained]
    if stopping not in STOPPING:
        raise ValueError(f"mixture_stopping {stopping!r} is not one of {', '.join(STOPPING)}")
    shares = np.asarray(weights, np.float64) / sum(weights)
    totals = np.asarray([t.sum() for t in trained], np.float64)
    empty = [i for i, total in enumerate(totals) if total <= 0]
    if empty:
        raise DataError(f"mixture source {empty[0]}: no trained tokens to mix")
    budget = (np.min if stopping == "first_exhausted" else np.max)(totals / shares)
    return [_take(t, share * budget, np.random.default_rng([seed, k])) for k, (t, share) in enumerate(zip(trained, shares))]


def _take(trained: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Whole documents in passes of fresh random orders until `target` trained tokens:
    the last one is taken when that lands nearer the target than stopping before it."""
    taken, total = [], 0.0
    while total < target:
        order = rng.permutation(len(trained))
        cumulative = total + np.cumsum(trained[order])
        count = int(np.searchsorted(cumulative, target))  # documents strictly below the target
        if count < len(order):
            below = cumulative[count - 1] if count else total
            count += int(cumulative[count] - target <= target - below)
            taken.append(order[:count])
            break
        taken.append(order)
        total = float(cumulative[-1])
    return np.concatenate(taken) if taken else np.zeros(0, np.int64)
