"""Data preparation streams: a dataset several times larger than Ray's object store is
prepared with the store capped at 80 MiB, and the object store's use stays a few blocks.

    python benchmarks/data_streaming.py [--documents 120000]

Prints one JSON object: input and output sizes against the object store's size, the
bytes Ray spilled from the object store to disk, and the seconds taken.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import ray
from pydantic_settings import BaseSettings, SettingsConfigDict

from data_pipeline import smollm2_tokenizer_dir, write_documents
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings

OBJECT_STORE_BYTES = 80 * 2**20  # Ray's smallest object store is 75 MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="data_streaming.py")

    documents: int = 120_000
    seq_len: int = 2048


def main() -> None:
    s = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        write_documents(path, s.documents)
        ray.init(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES)
        start = time.perf_counter()
        store = prepare_dataset(path, smollm2_tokenizer_dir(), DataSettings(seq_len=s.seq_len, packing=True),
                                Path(tmp) / "store", report=None)
        seconds = time.perf_counter() - start
        stats = ray._private.internal_api.get_memory_info_reply(
            ray._private.internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        ).store_stats
        rows = store.num_rows
        print(json.dumps({
            "benchmark": "data_streaming",
            "object_store_mib": OBJECT_STORE_BYTES / 2**20,
            "input_jsonl_mib": round(path.stat().st_size / 2**20, 1),
            "documents_mib": round(store.meta["tokens"] * 8 / 2**20, 1),  # ids + weights
            "rows_mib": round(rows * s.seq_len * 16 / 2**20, 1),  # four 4-byte fields
            "spilled_mib": round(stats.spilled_bytes_total / 2**20, 1),
            "seconds": round(seconds, 1),
        }, indent=2))
        ray.shutdown()


if __name__ == "__main__":
    main()
