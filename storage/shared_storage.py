"""Can this host read what the run needs where the driver put it? The driver writes a
marker with a fresh token into the run directory; a host that cannot read that token
there (a node-local disk, a mount missing on one host, a stale marker of an earlier run)
would checkpoint where no other host and no restart can find it. The same for a model
given as a local directory or file."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from etils import epath

from raysft.storage.files import first_line
from raysft.storage.locations import make_dir

MARKER = ".raysft-driver-marker"


class StorageUnreachable(ValueError):
    """The driver cannot write the run directory (missing bucket, credentials, permissions)."""


def write_marker(run_dir: epath.Path) -> tuple[str, str]:
    """(marker path, token) for the workers to check; the first write of a run, so an
    unwritable save_directory is one line naming it."""
    token = uuid.uuid4().hex
    marker = run_dir / MARKER
    try:
        make_dir(run_dir)
        marker.write_text(token)
    except Exception as err:  # noqa: BLE001 - missing bucket, credentials, permissions alike
        raise StorageUnreachable(f"save_directory: cannot write {run_dir}: {first_line(err)}") from None
    return str(marker), token


def unseen_marker(marker: tuple[str, str] | None) -> str | None:
    """Why this host does not see the driver's marker, or None when it does."""
    if marker is None:
        return None
    path, token = marker
    try:
        if epath.Path(path).read_text() == token:
            return None
    except Exception:  # noqa: BLE001 - missing, unreadable, no credentials on this host: all "not seen"
        pass
    return (
        f"save_directory {epath.Path(path).parent.parent} is not the driver's storage on host {socket.gethostname()} "
        f"({path} is missing or from another run): with more than one node it must be storage every host sees "
        "(s3:// or gs://, or a shared filesystem mounted at the same path on every host)"
    )


def unreadable_model(model: str) -> str | None:
    """Why this host cannot read `model` (a pinned `ModelSource`), or None when it can.
    Hub models are not checked: each host fetches those itself."""
    from raysft.workers.models.config import ModelLoadError
    from raysft.workers.models.source import ModelSource

    source = ModelSource.parse(model)
    path = Path(source.name)
    if source.kind in ("local", "gguf") and not (path / "config.json" if path.is_dir() else path).is_file():
        return (
            f"model {source.name} is not on host {socket.gethostname()}: a model directory or .gguf file must be on "
            "storage every host sees (or give a hub id or an s3:// / gs:// URI, which every host fetches itself)"
        )
    if source.kind == "object":
        try:
            source.listing()
        except ModelLoadError as err:
            return f"{err} (on host {socket.gethostname()})"
    return None


def what_this_host_misses(marker: tuple[str, str] | None, model: str) -> str | None:
    return unseen_marker(marker) or unreadable_model(model)


class StorageNotShared(ValueError):
    """This host cannot read the run directory or the model where the driver does: an
    input error, never restarted."""


def require_what_the_driver_sees(marker: tuple[str, str] | None, model: str) -> None:
    problem = what_this_host_misses(marker, model)
    if problem:
        raise StorageNotShared(problem)
