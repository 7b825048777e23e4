"""Which failures of a worker group restart it, against which budget.

Ray Train's own retry loop charges every worker error to `max_failures`, a config error
included, so each attempt runs with Ray's retries off and this policy decides: errors
in the inputs fail at once, preemptions and failures restart from the latest checkpoint
on budgets of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ray.exceptions import RayActorError
from ray.train.v2.api.exceptions import ControllerError, PreemptionError, WorkerGroupError

from raysft.workers.runtime.preemption import Preempted

Kind = Literal["input", "preemption", "failure"]

# Raised before training starts from a bad config, model, dataset or checkpoint; a
# restart would raise them again.
_INPUT_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, NotImplementedError)


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: Kind
    message: str  # one line: the cause on the lowest failing rank


def classify(error: BaseException) -> Failure:
    if isinstance(error, PreemptionError):
        return Failure("preemption", f"preemption of nodes {error.preemption_info.preempted_node_ids}")
    if isinstance(error, ControllerError):
        return Failure("failure", _one_line(error.controller_failure))
    failures = error.worker_failures if isinstance(error, WorkerGroupError) else {}
    if not failures:
        return Failure("failure", _one_line(error))
    failures = {rank: _unwrap(error) for rank, error in failures.items()}
    causes = [failures[rank] for rank in sorted(failures)]
    preempted = [c for c in causes if isinstance(c, Preempted) or (isinstance(c, RayActorError) and c.preempted)]
    if preempted:
        return Failure("preemption", _one_line(preempted[0]))
    died = [c for c in causes if isinstance(c, RayActorError)]
    if died:  # the other ranks' errors are collateral of a lost host
        rank = min(r for r, c in failures.items() if isinstance(c, RayActorError))
        return Failure("failure", f"rank {rank}: {_one_line(died[0])}")
    kind: Kind = "input" if all(isinstance(c, _INPUT_ERRORS) for c in causes) else "failure"
    return Failure(kind, _one_line(causes[0]))


class RestartBudget:
    def __init__(self, max_restarts: int, max_preemption_restarts: int):
        self.limits = {"failure": max_restarts, "preemption": max_preemption_restarts, "input": 0}
        self.used = {"failure": 0, "preemption": 0, "input": 0}

    def allow(self, failure: Failure) -> bool:
        """Charge one restart for `failure`; False when its budget is spent."""
        self.used[failure.kind] += 1
        return self.used[failure.kind] <= self.limits[failure.kind]

    def describe(self, failure: Failure) -> str:
        """"restart 2/3 (failure)"; once spent, "no restarts left (max_restarts=3)"."""
        kind, used, limit = failure.kind, self.used[failure.kind], self.limits[failure.kind]
        if used <= limit:
            return f"restart {used}/{limit} ({kind})"
        name = "max_restarts" if kind == "failure" else "max_preemption_restarts"
        return f"no restarts left ({name}={limit})"


def _unwrap(error: BaseException) -> BaseException:
    """A failed health check carries what failed: the dead worker's actor error."""
    return getattr(error, "health_check_failure", None) or error


def _one_line(cause: BaseException) -> str:
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
