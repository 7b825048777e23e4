"""Storage keys and hub tokens reach the tasks that need them, and nowhere else: not
Ray's state API (which anyone reaching the dashboard reads), not the run directory
(run.json, logs, wandb's offline files)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import boto3
import ray
from transformers import AutoTokenizer

import raysft as rs
from conftest import CORPUS


def test_secrets_stay_out_of_rays_state_api_and_the_run_directory(
    local_ray, tmp_path, tiny_model_dir, s3_server, monkeypatch
):
    from ray.util.state import list_actors, list_jobs, list_tasks

    monkeypatch.setenv("HF_TOKEN", "hf_SENTINELhubtoken")
    monkeypatch.setenv("WANDB_MODE", "offline")
    # The dataset is read by Ray Data tasks from a server that refuses requests without
    # the keys, in processes Ray started before they were set: they got the driver's.
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="private-data")
    s3.put_object(Bucket="private-data", Key="train.jsonl",
                  Body="".join(json.dumps({"text": text}) + "\n" for text in CORPUS * 4).encode())
    kwargs_secrets = {"token": "hf_SENTINELkwargtoken", "storage_options": {"secret": "SENTINELstorageoption"}}
    config = rs.SFTConfig(
        model_name="secrets", save_directory=str(tmp_path / "runs"), max_sequence_length=64, total_batch_size=4,
        num_hosts=1, max_training_steps=2, save_steps=2, use_wandb=True, dataset_kwargs=kwargs_secrets,
    )

    seen, done = [], threading.Event()
    address = ray.get_runtime_context().gcs_address  # the session's Ray: the machine may run others

    def poll_state_api():
        while not done.is_set():
            for listing in (list_actors, list_tasks, list_jobs):
                seen.append(repr(listing(address=address, detail=True, limit=10_000, raise_on_missing_output=False)))
            time.sleep(2)

    poller = threading.Thread(target=poll_state_api, daemon=True)
    poller.start()
    try:
        out = rs.SFTTrainer(
            arguments=config, model=rs.AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            train_dataset="s3://private-data/train.jsonl",
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), quiet=True,
        ).train()
    finally:
        done.set()
        poller.join()
    assert out.summary["final_step"] == 2

    state = "\n".join(seen)
    # The poll saw this run's tasks and their runtime_env: the endpoint travels there.
    assert "ReadJSONLines" in state and os.environ["AWS_ENDPOINT_URL"] in state
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["HF_TOKEN"],
               "hf_SENTINELkwargtoken", "SENTINELstorageoption"]
    assert not [secret for secret in secrets if secret in state]
    run_dir = Path(str(out.run_dir))
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.parent.name == "logs" for path in files) and any("wandb" in path.parts for path in files)
    for path in files:
        content = path.read_bytes()
        assert not [secret for secret in secrets if secret.encode() in content], path
    recorded = json.loads((run_dir / "run.json").read_text())["config"]["dataset_kwargs"]
    assert recorded == {"token": "<redacted>", "storage_options": {"secret": "<redacted>"}}
