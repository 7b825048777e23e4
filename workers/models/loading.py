"""Read Hugging Face safetensors into (sharded) JAX arrays, one slice per device.

Each process reads only the slices its own devices hold (safetensors slices lazily from
a memory map), so no host ever materialises a whole checkpoint it does not need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from safetensors import safe_open

from raysft.workers.models.config import ModelLoadError
from raysft.workers.models.params import ParamLayout, hf_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each Hugging Face tensor name to the safetensors file holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise ModelLoadError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {model_dir}")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def load_params(
    model_dir: Path,
    layout: ParamLayout,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding],
) -> dict[str, jax.Array]:
    """Flat params by name, each placed with `sharding_for(name, shape)`."""
    files = tensor_files(model_dir)
    handles = {}

    def open_file(path: Path):
        if path not in handles:
            handles[path] = safe_open(path, framework="numpy")
        return handles[path]

    params = {}
    for name, abstract in layout.shapes.items():
        key, transposed = hf_name(name)
        if key not in files:
            raise ModelLoadError(f"{model_dir}: tensor {key!r} missing from the checkpoint")
        tensor = open_file(files[key]).get_slice(key)
        stored_shape = tuple(tensor.get_shape())
        expected = abstract.shape[::-1] if transposed else abstract.shape
        if stored_shape != tuple(expected):
            raise ModelLoadError(
                f"{files[key]}: tensor {key!r} has shape {stored_shape}, config implies {tuple(expected)}"
            )

        def read(index, tensor=tensor, transposed=transposed, dtype=abstract.dtype):
            block = tensor[index[::-1]].T if transposed else tensor[index]
            return np.ascontiguousarray(block, dtype=dtype)

        params[name] = jax.make_array_from_callback(abstract.shape, sharding_for(name, abstract.shape), read)
    return params
