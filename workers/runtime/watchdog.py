"""Turn a hang into a restart: a host that stops making progress exits.

Progress is a dispatched step whose result became ready (checked off the training
thread, so the loop never syncs for it) or an explicit `progress()` between phases. A
host stuck in a collective whose peer died, or on a dead filesystem, exits with a
message; Ray sees the worker die and the driver restarts the group from the latest
checkpoint.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

EXIT_CODE = 75  # EX_TEMPFAIL


class Watchdog:
    def __init__(self, startup_timeout_s: float, step_timeout_s: float, rank: int, poll_s: float = 1.0):
        """Until the first step completes the limit is `startup_timeout_s` (it compiles)."""
        self.timeout_s = startup_timeout_s
        self.step_timeout_s = step_timeout_s
        self.what = "starting"
        self.rank = rank
        self.last_step = 0
        self._last_progress = time.monotonic()
        self._pending: collections.deque = collections.deque()  # (step, array) in flight
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), daemon=True)
        self._thread.start()

    def progress(self, what: str | None = None, timeout_s: float | None = None) -> None:
        """Mark progress now; optionally name the next phase and its limit."""
        with self._lock:
            self._last_progress = time.monotonic()
            if what is not None:
                self.what = what
            if timeout_s is not None:
                self.timeout_s = timeout_s

    def dispatched(self, step: int, result) -> None:
        """A step was dispatched; `result` (a small array it outputs) is ready when it is done."""
        with self._lock:
            self._pending.append((step, result))

    def close(self) -> None:
        self._stop.set()

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            with self._lock:
                while self._pending and self._pending[0][1].is_ready():
                    self.last_step = self._pending.popleft()[0]
                    self._last_progress = time.monotonic()
                    self.what, self.timeout_s = "training", self.step_timeout_s
                idle = time.monotonic() - self._last_progress
                if idle > self.timeout_s:
                    print(
                        f"raysft: rank {self.rank} made no progress for {idle:.0f} s ({self.what}; last completed "
                        f"step {self.last_step}); exiting so the group restarts from the latest checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(EXIT_CODE)
