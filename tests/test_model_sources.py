"""Models every host can read: local directories, pre-cached hub ids and `s3://` URIs on a
real S3-compatible server, fetched by each node into its own cache; a driver that never
reads the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import raysft as rs
from conftest import CORPUS, save_tiny_model, write_jsonl
from raysft.workers.models.config import ModelLoadError
from raysft.workers.models.source import ModelSource

TESTS = Path(__file__).parent
HUB_ID = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG_AND_TOKENIZER = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def cache_hub_model(hf_home: Path, model_dir: Path, files) -> None:
    """`files` of `model_dir` as the hub's cache holds HUB_ID at COMMIT (links, no copies)."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        os.link(model_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def upload(endpoint: str, model_dir: Path, bucket: str, prefix: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    for path in sorted(model_dir.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """~200 MB of fp32 weights (wide embeddings, cheap steps): big enough that a driver
    loading them would show in its memory."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("wide_llama")
    save_tiny_model(out, vocab_size=49_152, hidden_size=512)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def test_each_node_fetches_the_model_into_its_own_cache(tmp_path, wide_model_dir, s3_server):
    files = sorted(p.name for p in wide_model_dir.iterdir())
    for node in ("node0", "node1"):
        cache_hub_model(tmp_path / node / "hf", wide_model_dir, files)
    cache_hub_model(tmp_path / "driver" / "hf", wide_model_dir, [f for f in files if f in CONFIG_AND_TOKENIZER])
    uri = upload(s3_server, wide_model_dir, "models", "tiny")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in CORPUS * 2])

    env = {**os.environ, "HF_HOME": str(tmp_path / "driver" / "hf"), "HF_HUB_OFFLINE": "1",
           "RAYSFT_CACHE": str(tmp_path / "driver" / "raysft")}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, str(TESTS / "model_sources_worker.py"), str(tmp_path), HUB_ID, uri, str(data)],
        capture_output=True, text=True, env=env, timeout=900,  # about 2 min on 2 cores
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith('{"hub_losses"')))

    # Both runs trained the same weights: every node read them from its own cache (the
    # driver's has no weights at all), and the nodes never had the S3 credentials.
    assert len(result["hub_losses"]) == 1
    assert result["hub_losses"] == pytest.approx(result["s3_losses"], abs=1e-6)
    digest = ModelSource(uri).pinned().pin
    assert result["run_model"] == f"{uri}@{digest}"
    for node in ("node0", "node1"):
        assert [name.rsplit("-", 1)[1] for name in result["node_caches"][node]] == [digest]
    assert not result["handle_read_weights"]
    model_bytes = sum(p.stat().st_size for p in wide_model_dir.glob("*.safetensors"))
    assert model_bytes > 190e6
    assert result["driver_rss_growth"] < model_bytes / 2, result["driver_rss_growth"]


def test_object_storage_model_loads_lazily_with_the_same_logits(tmp_path, tiny_model_dir, s3_server, monkeypatch):
    monkeypatch.setenv("RAYSFT_CACHE", str(tmp_path / "cache"))
    uri = upload(s3_server, tiny_model_dir, "lazy", "models/tiny")
    model = rs.AutoModelForCausalLM.from_pretrained(uri)
    assert "params" not in vars(model)
    assert not list(model.model_dir.glob("*.safetensors"))  # config and tokenizer only
    ids = np.array([[1, 5, 9, 3, 7]])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(rs.AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids)))
    assert list(model.model_dir.glob("*.safetensors"))


def test_a_model_changed_after_the_driver_pinned_it_is_refused(tmp_path, tiny_model_dir, s3_server, monkeypatch):
    import boto3

    monkeypatch.setenv("RAYSFT_CACHE", str(tmp_path / "cache"))
    uri = upload(s3_server, tiny_model_dir, "changing", "m")
    pinned = ModelSource.parse(uri).pinned()
    assert ModelSource.parse(str(pinned)) == pinned
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket="changing", Key="m/config.json", Body=b"{}")
    with pytest.raises(ModelLoadError, match=rf"^model {uri} changed after the run started \(listing \w+, the driver read {pinned.pin}\)$"):
        pinned.fetch()


def test_bad_model_uris_are_one_line(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("RAYSFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"^model ftp://host/m: unsupported URI scheme 'ftp'; use a local path, a hub id or one of s3://, gs://, gcs://$"):
        rs.AutoModelForCausalLM.from_pretrained("ftp://host/m")
    with pytest.raises(ValueError, match=r"^model s3://no-such-bucket/m: cannot list: ") as err:
        rs.AutoModelForCausalLM.from_pretrained("s3://no-such-bucket/m")
    assert "\n" not in str(err.value)
    (tmp_path / "not_a_model").mkdir()
    upload(s3_server, Path(write_jsonl(tmp_path / "not_a_model" / "notes.jsonl", [])).parent, "nomodel", "m")
    with pytest.raises(ValueError, match=r"^model s3://nomodel/m has no config.json$"):
        rs.AutoModelForCausalLM.from_pretrained("s3://nomodel/m")
