"""LoRA adapters as PEFT directories: `adapter_config.json` and `adapter_model.safetensors`
with PEFT's tensor names, which `peft.PeftModel.from_pretrained(base, dir)` loads, and
read back so a run can continue an adapter trained elsewhere (`lora_init_from`). Base
parameters a LoRA run also trained (`trainable_parameters`: an embedding, norms) go in
whole, as PEFT's `modules_to_save`: peft then loads the model that was trained."""

from __future__ import annotations

import json
from typing import Callable

import jax
import numpy as np
from etils import epath
from safetensors.numpy import load as load_safetensors

from raysft.data.locations import location
from raysft.workers.models.config import ModelConfig, ModelLoadError
from raysft.workers.models.export import write_tensors
from raysft.workers.models.lora import LoraSettings, adapted_kernel, is_adapter, resolve_modules
from raysft.workers.models.params import hf_tensors, is_stacked

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(name: str, shape: tuple[int, ...]) -> list[tuple[str, bool]]:
    """(PEFT name, transposed) per layer of adapter `name`: ours `A` [in, r] and `B` [r, out],
    PEFT's `lora_A.weight` [r, in] and `lora_B.weight` [out, r] (torch Linear layouts)."""
    leaf = "lora_A" if name.endswith(".lora_a") else "lora_B"
    return [
        (PREFIX + key.replace(".weight", f".{leaf}.weight"), True)
        for key, _ in hf_tensors(adapted_kernel(name), shape)
    ]


_EMBEDDING = "model.embed_tokens.weight"
_TIED_HEAD = "tied output head"  # the embedding again, as the head PEFT ties to it


def _saved_tensors(name: str, shape: tuple[int, ...]) -> list[tuple[str, bool]]:
    """PEFT's names of an adapter's tensors, or of a base parameter saved whole."""
    if name == _TIED_HEAD:
        return [(PREFIX + "lm_head.weight", False)]
    if is_adapter(name):
        return peft_tensors(name, shape)
    return [(PREFIX + key, transposed) for key, transposed in hf_tensors(name, shape)]


def modules_to_save(base: dict[str, jax.Array], lora: LoraSettings) -> list[str]:
    """The Hugging Face modules holding trained base parameters `base`, as PEFT names
    them; ValueError where PEFT cannot hold one (a module that is also a LoRA target)."""
    modules = set()
    for name, value in base.items():
        for key, _ in hf_tensors(name, value.shape):
            module = key.rsplit(".", 1)[0]
            if module.rsplit(".", 1)[-1] in lora.modules:
                raise ValueError(
                    f"a PEFT adapter cannot hold {key}: it is trained whole and {module} also has a LoRA adapter "
                    "(PEFT saves a module one way, not both)"
                )
            modules.add(module)
    return sorted(modules)


def save_adapter(adapters: dict[str, jax.Array], lora: LoraSettings, out_dir: epath.Path, base_model: str,
                 trained_base: dict[str, jax.Array] | None = None, tied_embeddings: bool = False) -> None:
    """Call on every process (the tensors are gathered); process 0 writes. `trained_base`:
    base parameters trained beside the adapters, saved whole (`modules_to_save`); with
    `tied_embeddings`, PEFT ties the output head to a saved embedding, as training did."""
    trained_base = trained_base or {}
    try:
        saved = modules_to_save(trained_base, lora)
    except ValueError as err:  # a run from before check_run refused it
        raise ValueError(f"{err}; export the merged model instead") from None
    tied = tied_embeddings and "model.embed_tokens" in saved
    tensors = {**adapters, **trained_base}
    if tied:  # PEFT ties its copy of the head to the embedding's, and loads both from the file
        embedding = next(n for n in trained_base if hf_tensors(n, trained_base[n].shape)[0][0] == _EMBEDDING)
        tensors[_TIED_HEAD] = trained_base[embedding]
    write_tensors(tensors, out_dir, "float32", sorted(tensors), _saved_tensors, WEIGHTS_FILE)
    if jax.process_index() == 0:
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": list(lora.modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": saved or None,
            "ensure_weight_tying": tied,
            "inference_mode": True,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_adapter(
    path: str,
    lora: LoraSettings,
    cfg: ModelConfig,
    shapes: dict[str, jax.ShapeDtypeStruct],
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding],
) -> dict[str, jax.Array]:
    """A PEFT adapter directory's tensors as our adapters, placed by `sharding_for`; an
    adapter made for another rank, scale, set of projections or model shape is refused,
    naming the first difference."""
    weights_file = check_adapter(path, lora, cfg)
    tensors = load_safetensors(weights_file.read_bytes())
    out = {}
    for name, abstract in shapes.items():
        per_layer = []
        for key, transposed in peft_tensors(name, abstract.shape):
            expected = abstract.shape[1:] if is_stacked(name) else abstract.shape
            tensor = tensors.get(key)
            if tensor is None:
                raise ModelLoadError(f"lora_init_from: {weights_file} has no tensor {key}")
            found = tensor.T.shape if transposed else tensor.shape
            if tuple(found) != tuple(expected):
                raise ModelLoadError(
                    f"lora_init_from: {weights_file}: {key} has shape {tuple(tensor.shape)}, this model's adapter "
                    f"needs {tuple(expected[::-1] if transposed else expected)}"
                )
            per_layer.append(tensor.T if transposed else tensor)
        value = np.stack(per_layer) if is_stacked(name) else per_layer[0]
        value = np.ascontiguousarray(value.astype(abstract.dtype))
        out[name] = jax.make_array_from_callback(value.shape, sharding_for(name, value.shape), lambda index, v=value: v[index])
    return out


def check_adapter(path: str, lora: LoraSettings, cfg: ModelConfig) -> epath.Path:
    """The adapter's weights file, once its directory is complete and its config agrees
    with the run's LoRA settings."""
    directory = location(path)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for required in (config_file, weights_file):
        if not required.is_file():
            raise ModelLoadError(f"lora_init_from: {required} not found (a PEFT adapter directory holds "
                                 f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    mismatch = _config_mismatch(json.loads(config_file.read_text()), lora, cfg)
    if mismatch:
        raise ModelLoadError(f"lora_init_from: {config_file}: {mismatch}")
    return weights_file


def _config_mismatch(config: dict, lora: LoraSettings, cfg: ModelConfig) -> str | None:
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r}, raysft continues LORA adapters"
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            return f"{key} is set; raysft adapters are plain LoRA"
    if config.get("r") != lora.rank:
        return f"rank r={config.get('r')}, this run's lora_rank is {lora.rank}"
    if float(config.get("lora_alpha", 8)) != float(lora.alpha):
        return f"lora_alpha {config.get('lora_alpha')}, this run's lora_alpha is {lora.alpha}"
    targets = config.get("target_modules") or []
    try:
        modules = resolve_modules(targets, cfg)
    except ValueError as err:
        return str(err)
    if set(modules) != set(lora.modules):
        return f"target modules {sorted(modules)}, this run's lora_target_modules adapt {sorted(lora.modules)}"
    return None
