from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import raysft as rs
from raysft.orchestrator.config import read_yaml


def test_defaults_follow_the_seed():
    cfg = rs.SFTConfig()
    assert (cfg.learning_rate, cfg.packing, cfg.add_special_tokens, cfg.total_batch_size) == (2e-5, False, False, 16)


def test_unknown_key_is_an_error():
    with pytest.raises(ValidationError, match="unknown field 'learning_rat'; did you mean 'learning_rate'\\?"):
        rs.SFTConfig(learning_rat=1e-4)
    with pytest.raises(ValidationError, match=r"unknown field 'zzz' \["):  # nothing close: no guess
        rs.SFTConfig(zzz=1)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"learning_rate": 0}, "learning_rate\n  Input should be greater than 0"),
        ({"max_sequence_length": 1}, "max_sequence_length\n  Input should be greater than 1"),
        ({"scheduler": "none", "learning_rate_end": 1e-6}, "learning_rate_end is set but scheduler is 'none'"),
        ({"total_batch_size": 6, "num_hosts": 2, "cpu_devices_per_host": 2}, "total_batch_size 6 must be a multiple of 4: the 4 data-parallel"),
        ({"total_batch_size": 8, "num_hosts": 2, "gradient_accumulation_steps": 4, "cpu_devices_per_host": 2}, "must be a multiple of 16"),
        ({"num_hosts": 2, "sharding_axis_dims": (1, 3, -1, 1), "cpu_devices_per_host": 2}, r"sharding_axis_dims \(1, 3, -1, 1\) \(dp, fsdp, tp, sp\) do not fit the 4 devices"),
        ({"sharding_axis_dims": (1, -1, -1, 1)}, "at most one -1"),
        ({"dtype": "float16"}, "dtype\n  Input should be 'float32' or 'bfloat16'"),
        # Never a local folder named "ftp:" that the user takes for the server.
        ({"save_directory": "ftp://host/runs"}, r"ftp://host/runs: unsupported URI scheme .ftp.; use a local directory or one of s3://, gs://"),
    ],
)
def test_invalid_values_are_named(fields, message):
    with pytest.raises(ValidationError, match=message):
        rs.SFTConfig(**fields)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name: demo\nlearning_rate: 1.0e-4\nnum_hosts: 2\ntotal_batch_size: 8\n")
    cfg = rs.SFTConfig.from_yaml(path, save_directory=str(tmp_path))
    assert (cfg.model_name, cfg.learning_rate, cfg.num_hosts) == ("demo", 1e-4, 2)
    assert cfg.run_dir == tmp_path / "demo"


def test_importing_raysft_leaves_the_jax_backend_alone():
    # Workers set their device count and join jax.distributed after importing raysft;
    # any JAX computation at import time would make that fail.
    import subprocess
    import sys

    code = "import raysft; from jax._src import xla_bridge; print(bool(xla_bridge._backends))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docs_config_reference_is_generated_from_the_model():
    from raysft.orchestrator.reference import markdown

    reference = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert reference == markdown(), "run: python -m raysft.orchestrator.reference > docs/config.md"
    for name in rs.SFTConfig.model_fields:
        assert f"| `{name}` |" in reference


EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_name_their_own_command(path):
    import yaml

    text = path.read_text()
    if yaml.safe_load(text).get("kind") == "RayCluster":  # a KubeRay manifest, checked with the TPU tests
        return
    launch = {"dataset_name", "eval_dataset_name", "repo_id"}  # `raysft sft --config` keys, not SFTConfig's
    config_class = rs.DPOConfig if path.name.startswith("dpo") else rs.SFTConfig
    cfg = config_class(**{k: v for k, v in read_yaml(path).items() if k not in launch})
    if cfg.backend == "tpu":
        assert cfg.tpu_slice.num_workers == cfg.hosts > 1
    if path.name in ("demo.yaml", "dpo.yaml"):  # read by examples/demo.py and examples/dpo.py
        assert f"make {path.stem}" in text
    else:
        assert f"raysft sft --config examples/{path.name}" in text


def test_a_checkout_imports_without_the_installed_package(tmp_path):
    """`ray job submit --working-dir .` from a checkout, on nodes without raysft installed:
    the checkout's `raysft/` finds the subpackages next to it."""
    import subprocess
    import sys

    from conftest import copy_checkout

    copy_checkout(tmp_path)
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        "import raysft.orchestrator.cli as cli, raysft.workers.training.train_loop as loop; print(cli.__file__, loop.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "orchestrator" / "cli.py"), str(tmp_path / "workers" / "training" / "train_loop.py")]
