"""Saves step 1, then starts an async save of step 2 and SIGKILLs itself while orbax is
still writing it. Run as `python checkpoint_kill_worker.py CHECKPOINT_DIR` (a local
directory or an object-storage URI); prints what it saw at the moment of the kill."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
from etils import epath

from raysft.workers.checkpoints.checkpoint import Checkpoints


def step_2_committed() -> bool:
    """Locally a step is committed by renaming its directory to "2"; on object storage
    by the commit file written last into it."""
    if OBJECT_STORAGE:
        return (directory / "2" / "commit_success.txt").exists()
    return (directory / "2").exists()


def writing_step_2(entries: list[str]) -> bool:
    if OBJECT_STORAGE:
        return "2" in entries and not step_2_committed()
    return any(e.startswith("2") and e != "2" for e in entries)


directory = epath.Path(sys.argv[1])
OBJECT_STORAGE = sys.argv[1].startswith(("s3://", "gs://"))
ckpts = Checkpoints(directory, keep=None)
small = {"w": jnp.full((4,), 1.0)}
ckpts.save(1, small, {"count": jnp.int32(1)}, {"data_fingerprint": "abc"})
ckpts.wait()

# Large enough that writing it takes a while: the kill lands mid-write.
big = {"w": jax.random.normal(jax.random.key(0), (64, 1024, 1024))}  # 256 MB
ckpts.save(2, big, {"count": jnp.int32(2)}, {"data_fingerprint": "abc"})
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    entries = sorted(p.name for p in directory.iterdir())
    if writing_step_2(entries):
        print(json.dumps({"entries": entries, "step_2_committed": step_2_committed()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
print(json.dumps({"error": "no temporary step-2 directory appeared"}), flush=True)
