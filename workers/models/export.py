"""Write parameters in the Hugging Face layout that transformers and vLLM load."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save as safetensors_bytes
from safetensors.numpy import save_file

from raysft.storage.locations import is_object_storage, make_dir
from raysft.workers.models.config import ModelConfig, text_model_config
from raysft.workers.models.expert_tensors import checkpoint_tensors
from raysft.workers.models.fused import fused_rows
from raysft.workers.models.loading import INDEX_FILE, SINGLE_FILE
from raysft.workers.models.lora import is_adapter, merged_kernel
from raysft.workers.models.params import hf_tensors, is_stacked
from raysft.workers.models.quantization import Quantization, dequantize, is_codes, is_scale, scale_name

SHARD_BYTES = 5 * 1000**3
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@functools.lru_cache(maxsize=None)
def _gather_program(replicated: NamedSharding, dtype, stacked: bool) -> Callable:
    if stacked:
        take = lambda x, layer: jax.lax.dynamic_index_in_dim(x, layer, keepdims=False).astype(dtype)  # noqa: E731
    else:
        take = lambda x: x.astype(dtype)  # noqa: E731
    return jax.jit(take, out_shardings=replicated)


def _materialise(kernel, scales, adapter, quantization, lora_scale):
    """A kernel as transformers holds it: dequantized (QLoRA's base), its LoRA adapter merged."""
    if scales is not None:
        kernel = dequantize(kernel, scales, quantization)
    return merged_kernel(kernel, *adapter, lora_scale) if adapter else kernel


@functools.lru_cache(maxsize=None)
def _materialise_program(replicated: NamedSharding, dtype, stacked: bool, quantization, lora_scale) -> Callable:
    """`_materialise` (of one layer of a stacked kernel), gathered."""

    def program(kernel, scales, adapter, *layer):
        if stacked:
            kernel, scales, adapter = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer[0], keepdims=False),
                                                   (kernel, scales, adapter))
        return _materialise(kernel, scales, adapter, quantization, lora_scale).astype(dtype)

    return jax.jit(program, out_shardings=replicated)


def layer_gather(name: str, array, dtype: str) -> tuple[Callable, tuple]:
    """(program, arguments) that put one layer of stacked parameter `name` (the layer
    index is an argument: one program for every layer), or the whole of another, on
    every device in the export dtype: a whole stacked array is never gathered at once.
    `array` may be abstract (a ShapeDtypeStruct with a sharding) for `raysft plan`."""
    replicated = NamedSharding(array.sharding.mesh, P())
    stacked = is_stacked(name)
    program = _gather_program(replicated, jnp.dtype(EXPORT_DTYPES[dtype]), stacked)
    return program, ((array, jax.ShapeDtypeStruct((), jnp.int32)) if stacked else (array,))


def _to_host(
    name: str, params: dict[str, jax.Array], layer: int, dtype: str, writer: bool, lora_scale: float | None = None
) -> np.ndarray | None:
    """One layer (or the whole) of a parameter on the writing host, dequantized and with
    its LoRA adapter merged where `params` holds them. A collective on multi-device
    meshes: every process calls it for every piece."""
    array, stem = params[name], name.rsplit(".", 1)[0]
    adapted = lora_scale and name.endswith(".kernel") and f"{stem}.lora_a" in params
    adapter = (params[f"{stem}.lora_a"], params[f"{stem}.lora_b"]) if adapted else ()
    scales = params[scale_name(name)] if is_codes(name, params) else None
    quantization = Quantization.of(array, scales) if scales is not None else None
    stacked = is_stacked(name)
    if len(array.sharding.device_set) == 1:
        kernel, scales, adapter = jax.tree.map(lambda x: x[layer] if stacked else x, (array, scales, adapter))
        host = np.asarray(_materialise(kernel, scales, adapter, quantization, lora_scale))
        return host.astype(EXPORT_DTYPES[dtype]) if writer else None
    if adapter or scales is not None:
        replicated = NamedSharding(array.sharding.mesh, P())
        program = _materialise_program(replicated, jnp.dtype(EXPORT_DTYPES[dtype]), stacked, quantization, lora_scale)
        out = program(array, scales, adapter, *((np.int32(layer),) if stacked else ()))
    else:
        program, _ = layer_gather(name, array, dtype)
        out = program(array, np.int32(layer)) if stacked else program(array)
    # Every process waits for each gather, not only the writer: a process that runs ahead
    # has several gathers in flight, which the CPU runtime may run in another order than
    # the other processes, and their collectives then wait on each other for ever.
    out.block_until_ready()
    return np.asarray(out.addressable_data(0)) if writer else None


def _shard_plan(
    params: dict[str, jax.Array], itemsize: int, tensors_of: Callable = hf_tensors, fused: dict | None = None
) -> list[list[tuple[str, list[tuple[str, int, bool]]]]]:
    """Files of at most SHARD_BYTES: each a list of (file's tensor name, its parts: (param,
    layer piece, transposed)). A tensor has one part, or several that a fused checkpoint
    (`fused`: `fused.fused_rows`) concatenates along its rows, in the order they appear."""
    fused = fused or {}
    tensors: dict[str, list[tuple[int, str, int, bool]]] = {}
    sizes: dict[str, int] = {}
    for name in sorted(params):
        shape = params[name].shape
        piece_bytes = int(np.prod(shape[1:] if is_stacked(name) else shape)) * itemsize
        for piece, (key, transposed) in enumerate(tensors_of(name, shape)):
            key, start = (fused[key][0], fused[key][1]) if key in fused else (key, 0)
            tensors.setdefault(key, []).append((start, name, piece, transposed))
            sizes[key] = sizes.get(key, 0) + piece_bytes
    files: list[list[tuple[str, list[tuple[str, int, bool]]]]] = [[]]
    size = 0
    for key, parts in tensors.items():
        if size and size + sizes[key] > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1].append((key, [(name, piece, transposed) for _, name, piece, transposed in sorted(parts)]))
        size += sizes[key]
    return files


def save_pretrained(
    params: dict[str, jax.Array],
    hf_config: dict[str, Any],
    out_dir: epath.Path,
    dtype: str = "float32",
    lora_scale: float | None = None,
) -> None:
    """Write safetensors (sharded at 5 GB, with an index) and config.json to `out_dir`
    (a local directory or an object-storage prefix): the model raysft trained (from a
    multimodal source, its text-only language model: `text_model_config`), with fused
    projections fused again. LoRA adapters in `params` are merged into their kernels
    (`lora_scale`: alpha / r), a QLoRA base dequantized first: the model as it trained.

    Call on every process; only process 0 writes. Parameters are gathered one layer at a
    time and each file is written as soon as its tensors are gathered, so a device holds
    at most one layer's extra copy and the host one file's worth of weights.
    """
    base = [name for name in params if not is_adapter(name) and not is_scale(name)]
    cfg = ModelConfig.from_hf_dict(hf_config)
    write_tensors(
        params, out_dir, dtype, base, lora_scale=lora_scale, fused=fused_rows(cfg),
        checkpoint_layout=functools.partial(checkpoint_tensors, cfg),
    )
    if jax.process_index() == 0:
        config = dict(text_model_config(hf_config), torch_dtype=dtype, dtype=dtype)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_tensors(
    params: dict[str, jax.Array],
    out_dir: epath.Path,
    dtype: str,
    names: list[str],
    tensors_of: Callable = hf_tensors,
    single_file: str = SINGLE_FILE,
    lora_scale: float | None = None,
    fused: dict | None = None,
    checkpoint_layout: Callable[[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> None:
    """Parameters `names` of `params` as safetensors files in `out_dir` (one file, or
    shards of 5 GB with an index), each tensor named and laid out by `tensors_of`, fused
    where `fused` says the checkpoint holds them so, and split or renamed as
    `checkpoint_layout` says (a mixture of experts' experts: one tensor per expert)."""
    np_dtype = EXPORT_DTYPES[dtype]
    writer = jax.process_index() == 0
    files = _shard_plan({name: params[name] for name in names}, np.dtype(np_dtype).itemsize, tensors_of, fused)
    file_names = [single_file] if len(files) == 1 else [
        f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
    ]
    if writer:
        make_dir(out_dir)
    weight_map, total = {}, 0
    for file_name, entries in zip(file_names, files):
        tensors = {}
        for key, parts in entries:
            hosts = []
            for name, piece, transposed in parts:
                host = _to_host(name, params, piece, dtype, writer, lora_scale)
                hosts.append(host.T if writer and transposed else host)
            if writer:
                tensor = np.ascontiguousarray(hosts[0] if len(hosts) == 1 else np.concatenate(hosts))
                tensors.update(checkpoint_layout(key, tensor) if checkpoint_layout else {key: tensor})
        if writer:
            _save_safetensors(tensors, out_dir / file_name)
            weight_map.update(dict.fromkeys(tensors, file_name))
            total += sum(t.nbytes for t in tensors.values())
    if writer and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _save_safetensors(tensors: dict[str, np.ndarray], target: epath.Path) -> None:
    if is_object_storage(target):
        target.write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    else:
        save_file(tensors, target, metadata={"format": "pt"})


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def write_assets(
    out_dir: epath.Path, hf_config: dict[str, Any], model_dir: Path, tokenizer_dir: Path | None = None
) -> None:
    """Tokenizer files and generation_config.json next to exported weights, so the
    directory loads in transformers and vLLM as it is."""
    make_dir(out_dir)
    for name in TOKENIZER_FILES:
        source = (tokenizer_dir or model_dir) / name
        if source.is_file():
            (out_dir / name).write_bytes(source.read_bytes())
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        (out_dir / "generation_config.json").write_bytes(generation.read_bytes())
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        defaults = {k: hf_config[k] for k in keys if hf_config.get(k) is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(defaults, indent=2))
