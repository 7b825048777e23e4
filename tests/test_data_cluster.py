"""Data preparation at cluster scale: tasks on every node, the same store from 1 node or
2, and a driver whose memory does not grow with the tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import CORPUS, write_jsonl
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings

HERE = Path(__file__).parent


def _prepare_on_cluster(nodes: int, data: Path, tokenizer_dir: Path, root: Path, tpu_hosts: int = 0) -> dict:
    # A session of its own: on a timeout the cluster's processes go with the script.
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "data_cluster_worker.py"), str(nodes), str(data), str(tokenizer_dir), str(root),
         str(tpu_hosts)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_nodes_encode_and_write_rows_and_give_the_store_one_node_gives(local_ray, tmp_path, tokenizer_dir):
    """Two CPU nodes next to a v4-16 slice's two hosts: the CPU nodes do all the data work,
    and the store is the one the session's single-node Ray prepares."""
    rows = [{"text": " ".join(CORPUS[i % 6 : i % 6 + 1 + i % 3])} for i in range(60)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    two = _prepare_on_cluster(2, data, tokenizer_dir, tmp_path / "two", tpu_hosts=2)
    one = {"store": prepare_dataset(data, tokenizer_dir, DataSettings(seq_len=32, packing=True), tmp_path / "one",
                                    report=None, shard_rows=4).path}
    assert two["shards"] >= 4
    assert set(two["encoder_nodes"]) == set(two["worker_nodes"]), two  # both CPU nodes encoded
    assert set(two["row_writer_nodes"]) == set(two["worker_nodes"]), two  # both wrote row shards
    assert len(two["tpu_nodes"]) == 2 and two["reader_nodes"]
    assert not set(two["reader_nodes"]) & set(two["tpu_nodes"]), two  # reading claims no CPU: any node but a TPU host
    a, b = Path(one["store"]), Path(two["store"])
    assert a.name == b.name  # the same fingerprint
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "input_ids.00000.npy" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_driver_memory_does_not_grow_with_tokens(local_ray, tmp_path, tokenizer_dir):
    """6.7M tokens prepared; the driver's resident memory grows by far less than the
    tokens would take (ids and weights alone: 54 MB), let alone the rows (over 100 MB)."""
    psutil = pytest.importorskip("psutil")
    text = " ".join(CORPUS * 10)
    small = write_jsonl(tmp_path / "warm.jsonl", [{"text": "the cat"}] * 4)
    prepare_dataset(small, tokenizer_dir, DataSettings(seq_len=4096, packing=True), tmp_path / "s", report=None)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{i} {text}"} for i in range(2400)])

    process, peak, done = psutil.Process(), [0], threading.Event()
    before = process.memory_info().rss

    def watch():
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        store = prepare_dataset(data, tokenizer_dir, DataSettings(seq_len=4096, packing=True), tmp_path / "s",
                                report=None)
    finally:
        done.set()
        watcher.join()
    growth = max(peak[0], process.memory_info().rss) - before
    assert store.meta["tokens"] >= 5_000_000 and store.meta["documents"] == 2400
    assert growth < 32 * 2**20, f"driver grew by {growth / 2**20:.0f} MiB"
