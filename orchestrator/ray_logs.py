"""Ray's own output during a run goes to a file, so the console holds raysft's lines only.

Ray prints through three channels on the driver: Python loggers under "ray" (its start-up
lines, Ray Data's plans and progress), the stream of its workers' and daemons' output
(Gloo, JAX's distributed service, Ray Train, the raylet's warnings), which it forwards
to the driver's stdout/stderr, and C++ logging written straight to file descriptor 2.
`ray_logs_to` takes all three over; Python warnings, tracebacks and raysft's own lines
still reach the console, and a failure's exception names the file in a note."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from ray._private.ray_logging import global_worker_stdstream_dispatcher
from ray._private.worker import filter_autoscaler_events

LOG_FILE = "ray.log"
_HANDLER_NAME = "raysft_ray_log"
_active: list["_Capture"] = []
_lingering: "_Capture | None" = None  # the last run's file, while the Ray raysft connected to lives on
_connected_job: str | None = None  # the Ray job of the connection raysft made


class _Capture:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self.lock = threading.Lock()
        self.handler = logging.StreamHandler(self.file)
        self.handler.setLevel(logging.INFO)  # as Ray's console handlers (its DEBUG lines are in its session files)
        self.handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"))
        self.moved: list[tuple[logging.Logger, logging.Handler]] = []
        self.dispatcher_before: list | None = None
        self.stderr_before = None
        self.console_fd: int | None = None
        self.data_bars_before: bool | None = None

    def start(self) -> None:
        self._take_fd2()
        self._take_loggers()
        self.take_worker_output()

    def _take_fd2(self) -> None:
        """C++ lines (Ray's core worker, gRPC, XLA) write to descriptor 2: point it at the
        file, and give Python's sys.stderr a descriptor of its own on the console."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            self.console_fd = os.dup(2)
        except OSError:  # a process without descriptor 2 (a daemon): nothing to take
            return
        try:
            python_on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, ValueError, io.UnsupportedOperation):
            python_on_fd2 = False  # a notebook's or a test's own stream: leave it
        if python_on_fd2:
            self.stderr_before = sys.stderr
            sys.stderr = open(self.console_fd, "w", buffering=1, encoding=sys.stderr.encoding,
                              errors="backslashreplace", closefd=False)
        os.dup2(self.file.fileno(), 2)

    def _take_loggers(self) -> None:
        """Console handlers of Ray's loggers (Ray's own file handlers stay), and Ray
        Data's progress bars (raysft shows its own)."""
        if "ray.data" in sys.modules:  # imported by whatever prepares data (it configures its loggers then)
            context = sys.modules["ray.data"].DataContext.get_current()
            self.data_bars_before, context.enable_progress_bars = context.enable_progress_bars, False
        names = [name for name in logging.root.manager.loggerDict if name == "ray" or name.startswith("ray.")]
        for logger in map(logging.getLogger, names):
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
                    logger.addHandler(self.handler)
                    self.moved.append((logger, handler))

    def take_worker_output(self) -> None:
        """Once Ray is connected: its workers' forwarded output goes to the file."""
        import ray

        if self.dispatcher_before is not None or not ray.is_initialized():
            return
        global _lingering
        with global_worker_stdstream_dispatcher._lock:
            self.dispatcher_before = list(global_worker_stdstream_dispatcher.handlers)
            global_worker_stdstream_dispatcher.handlers = [(_HANDLER_NAME, self._write_batch)]
        if _lingering is not None:  # the last run's: this one takes over what it kept
            self.dispatcher_before = _lingering.dispatcher_before
            _lingering.close()
            _lingering = None

    def _write_batch(self, batch: dict) -> None:
        """One batch of a process's lines, tagged as Ray tags them (without colours)."""
        name = batch.get("actor_name") or batch.get("task_name")
        tag = f"({name + ' ' if name else ''}pid={batch.get('pid')}, ip={batch.get('ip')})"
        lines = batch.get("lines", [])
        if batch.get("pid") == "autoscaler":  # its events, not its status every few seconds
            lines = filter_autoscaler_events(lines)
        with self.lock:
            if not self.file.closed:
                self.file.writelines(f"{tag} {line}\n" for line in lines)

    def stop(self) -> None:
        """Everything back as it was, but for a Ray connection raysft made: its processes
        go on sending lines as they stop (actors being killed, the raylet at shutdown), and
        those keep going to this file until another run takes them or the process ends."""
        global _lingering
        linger = self.dispatcher_before is not None and _raysft_connected()
        if self.dispatcher_before is not None and not linger:
            with global_worker_stdstream_dispatcher._lock:
                global_worker_stdstream_dispatcher.handlers = self.dispatcher_before
        for logger, handler in self.moved:
            logger.removeHandler(self.handler)
            logger.addHandler(handler)
        if self.data_bars_before is not None:
            sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = self.data_bars_before
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if self.console_fd is not None:
            os.dup2(self.console_fd, 2)
            if self.stderr_before is not None:
                sys.stderr.close()
                sys.stderr = self.stderr_before
            os.close(self.console_fd)
        if linger:
            _lingering = self
        else:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.file.close()


@contextlib.contextmanager
def ray_logs_to(log_dir: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Within: Ray's output goes to `log_dir/ray.log`, whose path it yields (with
    `verbose`, Ray prints as it does, and it yields None; so does a nested use, whose
    output goes to the outer one's file)."""
    if verbose or _active:
        yield None
        return
    capture = _Capture(Path(log_dir) / LOG_FILE)
    capture.start()
    _active.append(capture)
    try:
        yield capture.path
    except BaseException as err:
        if capture.dispatcher_before is not None:  # Ray was involved: its lines may tell more
            err.add_note(f"Ray's own log lines of this run: {capture.path}")
        raise
    finally:
        _active.pop()
        capture.stop()


def after_connect(connected_here: bool) -> None:
    """Called once Ray is connected (by raysft, or before it): a run in `ray_logs_to`
    takes its workers' output too."""
    global _connected_job
    if connected_here:
        import ray

        _connected_job = ray.get_runtime_context().get_job_id()
    if _active:
        _active[-1].take_worker_output()


def _raysft_connected() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_job_id() == _connected_job
