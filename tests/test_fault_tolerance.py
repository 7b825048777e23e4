"""Restarts, checkpoints and TPU slices: the promises of a preemptible cluster.

The node-loss scenarios run in `fault_scenarios.py` on a multi-node Ray cluster of this
machine, in a process of their own.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import raysft as rs
from raysft.orchestrator.restarts import RestartBudget, classify
from raysft.orchestrator.tpu import TpuSlice

HERE = Path(__file__).parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    proc = subprocess.run(
        [sys.executable, str(HERE / "fault_scenarios.py"), str(out)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _attempts(records: list[dict]) -> list[list[int]]:
    """The steps each attempt trained, in order."""
    attempts: list[list[int]] = []
    for record in records:
        if record["event"] == "start":
            attempts.append([])
        elif record["event"] == "step":
            attempts[-1].append(record["step"])
    return attempts


def _params(export_dir: str) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(Path(export_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == np.float32
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


def test_drained_then_killed_node_resumes_each_time_and_ends_bit_identical(scenarios):
    """One run of a mixture-of-experts model (its experts split over both hosts) on object
    storage (a real S3-compatible server, see below) loses a node twice: drained for preemption after the checkpoint of step 10 (it saves at once, off
    the save_steps grid, and resumes there), then killed after the checkpoint of step 20
    (it resumes from the latest checkpoint there was). Its weights end as an uninterrupted
    run's, bit for bit."""
    base, run = scenarios["uninterrupted"], scenarios["node_drained_then_killed_s3"]
    assert "error" not in run and "error" not in run["event"], run
    restarts = [r for r in run["records"] if r["event"] == "restart"]
    assert [r["kind"] for r in restarts] == ["preemption", "failure"], restarts
    assert "Preempted" in restarts[0]["cause"]
    assert restarts[1]["cause"].startswith("rank ") and "Actor" in restarts[1]["cause"]  # the lost host's worker
    preempted = [r["step"] for r in run["records"] if r["event"] == "preempted"]
    starts = [r["start_step"] for r in run["records"] if r["event"] == "start"]
    latest_at_kill = max(run["event"]["checkpoints_at_kill"])
    # The second attempt starts at the preemption checkpoint; the third from the latest
    # checkpoint there was at the kill (one committed between the listing and the kill is
    # later still).
    assert len(preempted) == 1 and starts[:2] == [0, preempted[0]] and preempted[0] >= 10
    assert starts[2] >= latest_at_kill >= 20
    assert run["summary"]["start_step"] == starts[2] and run["summary"]["final_step"] == 30
    # Each attempt's steps run on from where it started: the drained one up to its
    # checkpoint, the killed one up to the kill (at or past the checkpoint the last one
    # starts from, so the steps in between are trained twice), the last one to the end.
    first, second, third = _attempts(run["records"])
    assert first == list(range(1, preempted[0] + 1))
    assert second == list(range(preempted[0] + 1, preempted[0] + 1 + len(second))) and second[-1] >= starts[2]
    assert third == list(range(starts[2] + 1, 31))
    _assert_bit_identical(_params(base["export_dir"]), _params(run["export_dir"]))


def test_run_on_object_storage_keeps_everything_in_the_bucket(scenarios):
    """save_directory=s3://... on a real S3-compatible server: checkpoints (orbax), data,
    tokenizer, run record, summary, report, Ray's log and export all go to the bucket (the run
    above resumed from the checkpoints there); each node reads what it needs into its own
    cache."""
    killed = scenarios["node_drained_then_killed_s3"]
    assert "error" not in killed, killed
    assert killed["run_dir"] == "s3://raysft-runs/runs/node_drained_then_killed_s3/fault"
    files = [f.removeprefix("runs/node_drained_then_killed_s3/fault/") for f in killed["bucket_files"]]
    for expected in ("run.json", "summary.json", "report/metrics.jsonl", "report/loss.png", "tokenizer/tokenizer.json",
                     "export/model.safetensors", "export/config.json", "export/tokenizer.json", "logs/ray.log"):
        assert expected in files, expected
    stores = {f.split("/")[1] for f in files if f.startswith("data/")}
    assert all(f"data/{s}/meta.json" in files for s in stores) and len(stores) == 1
    assert not any("/.preparing-" in f for f in files)  # the encoded documents are gone
    # Every training node (the two replacements too) read the rows and tokenizer from its own copy.
    store = stores.pop()
    readers = [node for node, copies in killed["node_caches"].items() if any(c.startswith(store) for c in copies)]
    assert len(readers) == 4, killed["node_caches"]
    steps = {int(f.split("/")[1]) for f in files if f.startswith("checkpoints/") and f.endswith("/commit_success.txt")
             and f.count("/") == 2}
    assert max(steps) == 30
    # `raysft export` of the latest checkpoint in the bucket: the weights training exported.
    assert "export-step-30/model.safetensors" in files
    _assert_bit_identical(_params(killed["export_dir"]), _params(killed["exported_latest"]))


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_kill_during_checkpoint_write_restores_previous_step(tmp_path, storage, request):
    """SIGKILL while step 2 is written: step 2 is never listed nor restored, step 1 is,
    and step 2 can be saved again over what the killed save left."""
    directory = str(tmp_path)
    if storage == "s3":
        import boto3

        request.getfixturevalue("s3_server")
        boto3.client("s3").create_bucket(Bucket="kill-during-save")
        directory = "s3://kill-during-save/run/checkpoints"
    proc = subprocess.run(
        [sys.executable, str(HERE / "checkpoint_kill_worker.py"), directory],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not seen.get("error") and not seen["step_2_committed"], seen
    assert any(e.startswith("2") for e in seen["entries"])  # killed mid-write

    import jax
    import jax.numpy as jnp

    from raysft.workers.checkpoints.checkpoint import Checkpoints

    ckpts = Checkpoints(directory, keep=None)
    assert ckpts.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    count = {"count": jax.ShapeDtypeStruct((), jnp.int32)}
    params, opt_state, meta = ckpts.restore(1, abstract, count, "abc")
    np.testing.assert_array_equal(np.asarray(params["w"]), np.ones(4))
    assert int(opt_state["count"]) == 1 and meta["step"] == 1
    ckpts.save(2, {"w": jnp.full((4,), 2.0)}, {"count": jnp.int32(2)}, {"data_fingerprint": "abc"})
    ckpts.close()
    ckpts = Checkpoints(directory, keep=None)
    assert ckpts.latest_step() == 2
    params, _, _ = ckpts.restore(2, abstract, count, "abc")
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full(4, 2.0))
    ckpts.close()


def test_changed_data_is_refused_unless_allowed(tmp_path):
    import jax
    import jax.numpy as jnp

    from raysft.workers.checkpoints.checkpoint import Checkpoints, ResumeMismatch

    ckpts = Checkpoints(tmp_path, keep=None)
    ckpts.save(3, {"w": jnp.ones(2)}, {}, {"data_fingerprint": "old"})
    ckpts.wait()
    abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(ResumeMismatch, match="trained on data old, this run prepared new; set allow_data_change=True"):
        ckpts.restore(3, abstract, {}, "new")
    params, _, meta = ckpts.restore(3, abstract, {}, "new", allow_data_change=True)
    assert meta["data_fingerprint"] == "old" and np.asarray(params["w"]).sum() == 2
    ckpts.close()


@pytest.mark.parametrize(
    "tpu_type, slices, accelerator, topology, workers, chips",
    [
        ("v4-8", 1, "TPU-V4", "2x2x1", 1, 4),
        ("v4-16", 1, "TPU-V4", "2x2x2", 2, 4),
        ("v5litepod-16", 2, "TPU-V5LITEPOD", "4x4", 8, 4),
        ("v6e-8", 1, "TPU-V6E", "2x4", 1, 8),
    ],
)
def test_tpu_scaling_config(tpu_type, slices, accelerator, topology, workers, chips):
    from ray.train import ScalingConfig

    config = rs.SFTConfig(tpu_type=tpu_type, num_slices=slices)
    tpu = config.tpu_slice
    assert config.backend == "tpu" and config.hosts == workers
    assert (tpu.accelerator_type, tpu.topology, tpu.num_workers, tpu.chips_per_host) == (accelerator, topology, workers, chips)
    assert tpu.hosts_per_slice == workers // slices
    # Ray Train accepts it as it is: it validates workers against the topology itself.
    scaling = ScalingConfig(
        num_workers=tpu.num_workers, use_tpu=True, topology=tpu.topology,
        accelerator_type=tpu.accelerator_type, resources_per_worker=tpu.resources_per_worker,
    )
    assert scaling.num_tpus_per_worker == chips
    # The same slice by accelerator type and topology.
    assert TpuSlice.resolve(None, accelerator, topology, slices) == tpu


def test_tpu_config_errors():
    with pytest.raises(ValueError, match="v4 slices have 8, 16, 32"):
        rs.SFTConfig(tpu_type="v4-12")
    with pytest.raises(ValueError, match="num_hosts 4 contradicts 1 x v4-16, which has 2 hosts"):
        rs.SFTConfig(tpu_type="v4-16", num_hosts=4)
    with pytest.raises(ValueError, match="a TPU slice is set .* but backend is 'cpu'"):
        rs.SFTConfig(tpu_type="v4-16", backend="cpu")
    with pytest.raises(ValueError, match="num_slices > 1 needs a TPU slice"):
        rs.SFTConfig(num_slices=2)
    with pytest.raises(ValueError, match="topology '3x3' is not a v6e topology"):
        rs.SFTConfig(accelerator_type="TPU-V6E", topology="3x3")


def test_restart_policy_classifies_failures():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from raysft.workers.checkpoints.checkpoint import ResumeMismatch
    from raysft.workers.runtime.preemption import Preempted

    def group(*errors):
        return WorkerGroupError("x", dict(enumerate(errors)))

    assert classify(group(ResumeMismatch("other data"), ResumeMismatch("other data"))).kind == "input"
    assert classify(group(Preempted("saved step 7"), RuntimeError("gloo"))).kind == "preemption"
    died = classify(group(RuntimeError("collective aborted"), ActorDiedError()))
    assert died.kind == "failure" and died.message.startswith("rank 1: ActorDiedError")
    unhealthy = WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())
    assert classify(group(unhealthy)).message.startswith("rank 0: ActorDiedError")
    assert classify(group(RuntimeError("XLA error"))).kind == "failure"
    budget = RestartBudget(max_restarts=1, max_preemption_restarts=2)
    failure, preemption = classify(group(RuntimeError("x"))), classify(group(Preempted("y")))
    assert budget.allow(failure) and not budget.allow(failure)
    assert budget.allow(preemption) and budget.allow(preemption) and not budget.allow(preemption)
    assert not RestartBudget(3, 3).allow(classify(group(ValueError("bad"))))


def test_cluster_yaml_passes_ray_autoscaler_validation():
    from ray.autoscaler._private.gcp.config import get_node_type
    from ray.autoscaler._private.gcp.node import GCPNodeType
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    # Ray's GCP provider decides what a node config is (and checks acceleratorType).
    tpus = {name: t for name, t in types.items() if get_node_type(t["node_config"]) == GCPNodeType.TPU}
    assert get_node_type(types[config["head_node_type"]]["node_config"]) == GCPNodeType.COMPUTE
    assert {t["node_config"]["acceleratorType"] for t in tpus.values()} >= {"v4-16", "v5litepod-16"}
    for t in tpus.values():
        scheduling = t["node_config"]["schedulingConfig"]
        assert scheduling.get("preemptible") or scheduling.get("spot")
        assert t["max_workers"] > t["min_workers"] == 0  # slices come and go with demand
    # A CPU node type for data preparation, which raysft keeps off TPU hosts.
    cpus = {name: t for name, t in types.items() if name not in tpus and name != config["head_node_type"]}
    assert [t["resources"]["CPU"] for t in cpus.values()] and all(t["resources"]["CPU"] > 0 for t in cpus.values())
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["tpu_v4_16"]["min_workers"] = "two"
    with pytest.raises(Exception, match="min_workers"):
        validate_config(prepare_config(broken))


def test_tpu_examples_agree_with_the_slice():
    """The run config, the KubeRay worker group and Ray's sizing describe the same slice."""
    config = rs.SFTConfig.from_yaml(ROOT / "examples" / "tpu_v4_16.yaml")
    tpu = config.tpu_slice
    assert (tpu.tpu_type, tpu.num_workers, config.hosts) == ("v4-16", 2, 2)
    kuberay = yaml.safe_load((ROOT / "examples" / "kuberay_tpu_v4_16.yaml").read_text())
    groups = {g["groupName"]: g for g in kuberay["spec"]["workerGroupSpecs"]}
    group = groups["tpu-v4-16"]
    pod = group["template"]["spec"]
    assert int(groups["cpu-data"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) > 0
    assert group["numOfHosts"] == tpu.hosts_per_slice
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == tpu.topology
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == str(tpu.chips_per_host)
    assert kuberay["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


WATCHDOG = """
import sys, time
import jax.numpy as jnp
from raysft.workers.runtime.watchdog import Watchdog

class Hung:  # a step whose result never arrives, as behind a collective with a dead peer
    def is_ready(self):
        return False

dog = Watchdog(startup_timeout_s=30, step_timeout_s=1.5, rank=3, poll_s=0.1)
for step in range(1, 31):  # completed steps keep it quiet well past the step timeout
    dog.dispatched(step, jnp.ones(()) * step)
    time.sleep(0.1)
dog.dispatched(31, Hung())
print(f"dispatched 31 at {time.time()}", flush=True)
time.sleep(30)
print("still alive", flush=True)
"""


def test_watchdog_turns_a_hang_into_an_exit():
    proc = subprocess.run([sys.executable, "-c", WATCHDOG], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    ended = time.time()
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "dispatched 31" in proc.stdout and "still alive" not in proc.stdout
    assert "rank 3 made no progress for 2 s (training; last completed step 30)" in proc.stderr
    # From the hang, not from the start: a loaded machine may take long to import JAX.
    hung_at = float(proc.stdout.split("dispatched 31 at ")[1].split()[0])
    assert ended - hung_at < 15


def test_save_policy_by_steps_and_by_time():
    from raysft.workers.checkpoints.checkpoint import SavePolicy

    by_steps = SavePolicy(save_steps=3, save_interval_minutes=None, log_steps=1)
    assert [by_steps.due(s) for s in range(1, 7)] == [None, None, "steps", None, None, "steps"]
    by_time = SavePolicy(save_steps=None, save_interval_minutes=1 / 60, log_steps=2)  # one second
    assert by_time.due(2) is None
    time.sleep(1.1)
    assert by_time.due(3) is None  # the clock is read at log steps only: every host agrees
    assert by_time.due(4) == "interval"
    by_time.saved()
    assert by_time.due(6) is None


def test_save_total_limit_keeps_exactly_the_newest(tmp_path):
    import jax
    import jax.numpy as jnp
    from etils import epath

    from raysft.orchestrator.export import checkpoint_steps
    from raysft.workers.checkpoints.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    for step in (2, 4, 6, 8, 10):
        checkpoints.save(step, {"w": jnp.full((3,), float(step))}, {"count": jnp.asarray(step)}, {"data_fingerprint": "d"})
    checkpoints.close()
    assert checkpoint_steps(epath.Path(tmp_path)) == [8, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "8"]
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, {"count": jax.ShapeDtypeStruct((), jnp.int32)}
    params, _, _ = Checkpoints(str(tmp_path / "checkpoints"), keep=None).restore(10, *abstract, "d")
    assert np.asarray(params["w"]).tolist() == [10.0] * 3
