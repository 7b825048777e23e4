"""Saves step 1, then starts an async save of step 2 and SIGKILLs itself while orbax is
still writing it. Run as `python checkpoint_kill_worker.py CHECKPOINT_DIR`; prints what
it saw at the moment of the kill."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from raysft.workers.checkpoint import Checkpoints

directory = Path(sys.argv[1])
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
    writing = [e for e in entries if e.startswith("2") and e != "2"]
    if writing:
        print(json.dumps({"entries": entries, "step_2_committed": (directory / "2").exists()}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
print(json.dumps({"error": "no temporary step-2 directory appeared"}), flush=True)
