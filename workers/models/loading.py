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

from raysft.workers.models.config import ModelConfig, ModelLoadError
from raysft.workers.models.expert_tensors import expert_stack, is_experts_key, router_key
from raysft.workers.models.fused import RowSlice, fused_rows
from raysft.workers.models.params import ParamLayout, hf_tensors, is_stacked
from raysft.workers.models.quantization import Quantization, is_codes, quantize_program, scale_name

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


class ParamReader:
    """Reads parameters slice by slice and counts the bytes this process read."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.files = tensor_files(model_dir)
        cfg = ModelConfig.from_file(model_dir / "config.json")
        self.cfg, self.fused, self.prefix = cfg, fused_rows(cfg), cfg.checkpoint_prefix
        self.handles = {}
        self.bytes_read = 0

    def _open(self, key: str):
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="numpy")
        return self.handles[path].get_slice(key)

    def _tensor(self, key: str, expected: tuple[int, ...]):
        if is_experts_key(key):
            try:
                tensor = expert_stack(self.cfg, key, self.files.__contains__, self._open)
            except KeyError as err:
                raise ModelLoadError(f"{self.model_dir}: tensor {err.args[0]!r} missing from the checkpoint") from None
            return self._checked(tensor, key, expected)
        if router_key(self.cfg, key) in self.files:  # Mixtral's, as published (else transformers 5's name)
            key = router_key(self.cfg, key)
        rows = None
        if self.prefix + key not in self.files and key in self.fused:  # a part of a fused projection
            key, *rows = self.fused[key]
        key = self.prefix + key  # a multimodal checkpoint's language model
        if key not in self.files:
            raise ModelLoadError(f"{self.model_dir}: tensor {key!r} missing from the checkpoint")
        tensor = self._open(key)
        return self._checked(RowSlice(tensor, *rows) if rows else tensor, key, expected)

    def _checked(self, tensor, key: str, expected: tuple[int, ...]):
        if tuple(tensor.get_shape()) != tuple(expected):
            raise ModelLoadError(
                f"{self.files.get(key, self.model_dir)}: tensor {key!r} has shape {tuple(tensor.get_shape())}, "
                f"config implies {tuple(expected)}"
            )
        return tensor

    def read(self, name: str, abstract: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array:
        stacked = is_stacked(name)
        layer_shape = abstract.shape[1:] if stacked else abstract.shape
        tensors = [
            (self._tensor(key, layer_shape[::-1] if transposed else layer_shape), transposed)
            for key, transposed in hf_tensors(name, abstract.shape)
        ]

        def read_block(tensor, transposed, index):
            block = tensor[index[::-1]].T if transposed else tensor[index]
            return np.asarray(block, dtype=abstract.dtype)

        def read(index):
            if stacked:
                layers = range(len(tensors))[index[0]]
                block = np.stack([read_block(*tensors[i], index[1:]) for i in layers])
            else:
                block = read_block(*tensors[0], index)
            self.bytes_read += block.nbytes
            return np.ascontiguousarray(block)

        return jax.make_array_from_callback(abstract.shape, sharding, read)


def load_params(
    model_dir: Path,
    layout: ParamLayout,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding],
) -> tuple[dict[str, jax.Array], int]:
    """Flat params by name, each placed with `sharding_for(name, shape)`, and the bytes
    this process read to build its shards."""
    reader = ParamReader(model_dir)
    params = {
        name: reader.read(name, abstract, sharding_for(name, abstract.shape))
        for name, abstract in layout.shapes.items()
    }
    return params, reader.bytes_read


def load_quantized(
    model_dir: Path,
    shapes: dict[str, jax.ShapeDtypeStruct],
    quantization: Quantization,
    read_dtype,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding],
) -> tuple[dict[str, jax.Array], int]:
    """QLoRA's base: each kernel of `shapes` read in `read_dtype` and quantized at once
    into its codes and `kernel_scale` (both in `shapes`), one kernel at a time, so a device
    holds at most one full-precision kernel besides the codes."""
    reader = ParamReader(model_dir)
    params = {}
    for name, abstract in shapes.items():
        if is_codes(name, shapes):
            scale = scale_name(name)
            full = reader.read(name, jax.ShapeDtypeStruct(abstract.shape, read_dtype), sharding_for(name, abstract.shape))
            out = (sharding_for(name, abstract.shape), sharding_for(scale, shapes[scale].shape))
            params[name], params[scale] = quantize_program(quantization, out)(full)
            full.delete()
    return params, reader.bytes_read
