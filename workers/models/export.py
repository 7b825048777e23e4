"""Write parameters in the Hugging Face layout that transformers and vLLM load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from raysft.workers.models.loading import INDEX_FILE, SINGLE_FILE
from raysft.workers.models.params import hf_name

SHARD_BYTES = 5 * 1000**3
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _to_host(array: jax.Array) -> np.ndarray:
    # A collective on multi-host meshes: every process must call this for every array.
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def save_pretrained(
    params: dict[str, jax.Array],
    hf_config: dict[str, Any],
    out_dir: Path,
    dtype: str = "float32",
) -> None:
    """Write safetensors (sharded at 5 GB, with an index) and config.json to `out_dir`.

    Call on every process; only process 0 writes.
    """
    np_dtype = EXPORT_DTYPES[dtype]
    writer = jax.process_index() == 0
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name in sorted(params):
        tensor = _to_host(params[name])
        if not writer:
            continue
        key, transposed = hf_name(name)
        tensor = np.ascontiguousarray(tensor.T if transposed else tensor, dtype=np_dtype)
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += tensor.nbytes
    if not writer:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out_dir / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.nbytes for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = dict(hf_config, torch_dtype=dtype, dtype=dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
