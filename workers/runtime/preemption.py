"""Preemption notices: save at one step agreed by every host, then end the attempt.

JAX's preemption sync point is the agreement: when any host gets a notice (SIGTERM, as
a TPU VM or a Kubernetes pod gets before it is reclaimed), all hosts learn the same
safe step to save at. Ray's drain notice (the autoscaler or a spot reclaim draining a
node) is turned into that same SIGTERM notice, so there is one protocol, and checking
it costs nothing per step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """The attempt ended after a preemption checkpoint; the driver restarts it."""


class PreemptionNotice:
    def __init__(self, poll_s: float = 0.5):
        from jax.experimental import multihost_utils

        self._reached = multihost_utils.reached_preemption_sync_point
        self._enabled = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch_ray_drain, args=(poll_s,), daemon=True)
        self._thread.start()

    def reached(self, step: int) -> bool:
        """True on every host at the same step once any host got a notice; call every step."""
        if not self._enabled:
            return False
        try:
            return self._reached(step)
        except RuntimeError:  # jax.distributed without its preemption service: SIGTERM only
            self._enabled = False
            return False

    def close(self) -> None:
        self._stop.set()

    def _watch_ray_drain(self, poll_s: float) -> None:
        try:  # Ray Train's per-worker preemption mark: a local read, no collective
            from ray.train.v2._internal.execution.context import get_train_context

            context = get_train_context().preemption_context
        except Exception:  # not under Ray Train, or its internals moved
            return
        while not self._stop.wait(poll_s):
            info = context.preemption_info
            if info is not None:
                log.warning("node drain announced (ranks %s): saving at the next agreed step", info.preempted_ranks)
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier owns SIGTERM once jax.distributed is up
                return
