"""Preparation that stops making progress ends with an error saying so, instead of a
driver waiting forever: a read stuck on a dead mount or object store, or encoders that
no node has CPUs for (a cluster of TPU hosts only, a CPU node type that never comes)."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

import ray

from raysft.data.data_nodes import cpus_matching
from raysft.storage.errors import DataError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class Stalled(DataError):
    """No progress for the allowed time; the message says what was waited for."""


def stalled(name: str, timeout_s: float, what: str) -> Stalled:
    selector = ray.data.DataContext.get_current().execution_options.label_selector
    free = ray.available_resources().get("CPU", 0)
    if selector:
        where = (f"{cpus_matching(selector):g} CPUs on nodes that are not TPU hosts (add a CPU node type, "
                 "or set data_on_tpu_hosts)")
    else:
        where = f"{free:g} of {ray.cluster_resources().get('CPU', 0):g} CPUs free"
    return Stalled(
        f"{name}: data preparation made no progress for {timeout_s:g} s while {what} ({where}): a stuck read, or "
        "no node with CPUs to run on; data_timeout_s sets this limit"
    )


def until_stalled(items: Iterator[T], timeout_s: float, name: str, what: str) -> Iterator[T]:
    """`items`, each due within `timeout_s` of the one before; else `Stalled`. They are
    produced on a thread of their own, since a stuck Ray Data iterator cannot be timed out."""
    handoff: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                handoff.put(item)
            handoff.put(done)
        except BaseException as err:  # noqa: BLE001 - re-raised on the consuming thread
            handoff.put(err)

    threading.Thread(target=produce, name="raysft-data-producer", daemon=True).start()
    while True:
        try:
            item = handoff.get(timeout=timeout_s)
        except queue.Empty:
            raise stalled(name, timeout_s, what) from None
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
