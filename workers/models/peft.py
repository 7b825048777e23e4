"""LoRA adapters as PEFT directories: `adapter_config.json` and `adapter_model.safetensors`
with PEFT's tensor names, which `peft.PeftModel.from_pretrained(base, dir)` loads, and
read back so a run can continue an adapter trained elsewhere (`lora_init_from`). Base
parameters a LoRA run also trained (`trainable_parameters`: an embedding, norms) go in
whole, as PEFT's `modules_to_save`: peft then loads the model that was trained."""

from __future__ import annotations

import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors.numpy import load as load_safetensors

from raysft.storage.locations import location
from raysft.workers.models.config import ModelConfig, ModelLoadError
from raysft.workers.models.expert_adapters import (
    adapted_experts, peft_expert_adapters, peft_key, peft_patterns, split_expert_adapter,
)
from raysft.workers.models.export import write_tensors
from raysft.workers.models.fused import fused_rows
from raysft.workers.models.lora import LoraSettings, adapted_kernel, is_adapter, peft_target_modules, resolve_modules
from raysft.workers.models.params import hf_tensors, is_stacked

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> list[tuple[str, bool]]:
    """(PEFT name, transposed) per layer of adapter `name`: ours `A` [in, r] and `B` [r, out],
    PEFT's `lora_A.weight` [r, in] and `lora_B.weight` [out, r] (torch Linear layouts). An
    expert projection's, as `split_expert_adapter` names what it reads."""
    leaf = "lora_A" if name.endswith(".lora_a") else "lora_B"
    if ".experts." in name:
        return [(f"{PREFIX}{key}.{name.rsplit('.', 1)[1]}", False) for key, _ in hf_tensors(adapted_kernel(name), shape)]
    return [
        (PREFIX + cfg.module_name(key).replace(".weight", f".{leaf}.weight"), True)
        for key, _ in hf_tensors(adapted_kernel(name), shape)
    ]


_EMBEDDING = "model.embed_tokens.weight"
_TIED_HEAD = "tied output head"  # the embedding again, as the head PEFT ties to it


def _saved_tensors(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> list[tuple[str, bool]]:
    """PEFT's names of an adapter's tensors, or of a base parameter saved whole."""
    if name == _TIED_HEAD:
        return [(PREFIX + "lm_head.weight", False)]
    if is_adapter(name) and ".experts." in name:  # `peft_expert_adapters` made it in PEFT's layout
        leaf = "lora_A" if name.endswith(".lora_a") else "lora_B"
        return [(PREFIX + peft_key(key, leaf), False) for key, _ in hf_tensors(adapted_kernel(name), shape)]
    if is_adapter(name):
        return peft_tensors(name, shape, cfg)
    return [(PREFIX + cfg.module_name(key), transposed) for key, transposed in hf_tensors(name, shape)]


def modules_to_save(base: dict[str, jax.Array], lora: LoraSettings, cfg: ModelConfig) -> list[str]:
    """The Hugging Face modules holding trained base parameters `base`, as PEFT names
    them; ValueError where PEFT cannot hold one (a module that is also a LoRA target, or
    a part of a fused one)."""
    modules, fused = set(), fused_rows(cfg)
    for name, value in base.items():
        for key, _ in hf_tensors(name, value.shape):
            if key in fused:
                raise ValueError(
                    f"a PEFT adapter cannot hold {key}: the checkpoint holds it inside {fused[key][0]}, "
                    "which PEFT would save whole"
                )
            module = cfg.module_name(key.rsplit(".", 1)[0])
            if module.rsplit(".", 1)[-1] in lora.modules:
                raise ValueError(
                    f"a PEFT adapter cannot hold {key}: it is trained whole and {module} also has a LoRA adapter "
                    "(PEFT saves a module one way, not both)"
                )
            modules.add(module)
    return sorted(modules)


def fused_adapters(adapters: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """The adapters of the projections a checkpoint fuses (Phi-3's q, k and v in
    `qkv_proj`) as one adapter of the fused module, exactly: A' = [A_q A_k A_v] (rank n r)
    and a block-diagonal B', so x A' B' = [x A_q B_q, x A_k B_k, x A_v B_v]. PEFT scales it
    by n alpha / (n r) (`rank_pattern`, `alpha_pattern`), as raysft scales each part."""
    out = dict(adapters)
    for fused, parts in cfg.family.fused:
        block = fused.rsplit(".", 1)[0]
        for a_name in [n for n in adapters if n.endswith(f".{block}.{parts[0]}.lora_a")]:
            stem = a_name[: -len(f"{block}.{parts[0]}.lora_a")]
            a = [out.pop(f"{stem}{block}.{part}.lora_a") for part in parts]
            b = [out.pop(f"{stem}{block}.{part}.lora_b") for part in parts]
            rows = [jnp.concatenate([bj if i == j else jnp.zeros_like(bi) for i, bi in enumerate(b)], axis=-1)
                    for j, bj in enumerate(b)]
            out[f"{stem}{fused}.lora_a"] = jnp.concatenate(a, axis=-1)
            out[f"{stem}{fused}.lora_b"] = jnp.concatenate(rows, axis=-2)
    return out


def _fused_patterns(lora: LoraSettings, cfg: ModelConfig) -> tuple[dict, dict]:
    """PEFT's per-module rank and alpha for the fused modules `fused_adapters` writes."""
    ranks, alphas = {}, {}
    for fused, parts in cfg.family.fused:
        if parts[0] in lora.modules:
            module = fused.rsplit(".", 1)[1]
            ranks[module], alphas[module] = lora.rank * len(parts), lora.alpha * len(parts)
    return ranks, alphas


def save_adapter(adapters: dict[str, jax.Array], lora: LoraSettings, out_dir: epath.Path, base_model: str,
                 cfg: ModelConfig, trained_base: dict[str, jax.Array] | None = None) -> None:
    """Call on every process (the tensors are gathered); process 0 writes. `trained_base`:
    base parameters trained beside the adapters, saved whole (`modules_to_save`); with
    tied embeddings, PEFT ties the output head to a saved embedding, as training did."""
    trained_base = trained_base or {}
    try:
        saved = modules_to_save(trained_base, lora, cfg)
    except ValueError as err:  # a run from before check_run refused it
        raise ValueError(f"{err}; export the merged model instead") from None
    tied = cfg.tie_word_embeddings and cfg.module_name("model.embed_tokens") in saved
    experts = peft_expert_adapters(adapters, lora.modules, lora.rank)
    tensors = {**fused_adapters(experts, cfg), **trained_base}
    if tied:  # PEFT ties its copy of the head to the embedding's, and loads both from the file
        embedding = next(n for n in trained_base if hf_tensors(n, trained_base[n].shape)[0][0] == _EMBEDDING)
        tensors[_TIED_HEAD] = trained_base[embedding]
    write_tensors(tensors, out_dir, "float32", sorted(tensors), functools.partial(_saved_tensors, cfg), WEIGHTS_FILE)
    if jax.process_index() == 0:
        rank_pattern, alpha_pattern = _fused_patterns(lora, cfg)
        expert_ranks, expert_alphas = peft_patterns(lora.modules, lora.rank, lora.alpha)
        rank_pattern, alpha_pattern = {**rank_pattern, **expert_ranks}, {**alpha_pattern, **expert_alphas}
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": peft_target_modules(lora.modules, cfg),
            "target_parameters": list(adapted_experts(lora.modules)) or None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
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
    tensors = _split_fused(split_expert_adapter(tensors, cfg, lora.rank), cfg, lora.rank)
    out = {}
    for name, abstract in shapes.items():
        per_layer = []
        for key, transposed in peft_tensors(name, abstract.shape, cfg):
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


def _split_fused(tensors: dict[str, np.ndarray], cfg: ModelConfig, rank: int) -> dict[str, np.ndarray]:
    """A fused module's adapter as its projections' adapters, exactly: each part takes
    its rows of B. From `fused_adapters` (rank n r, block-diagonal B) each part takes its
    block of A and B's columns; from PEFT's own training (rank r, one A shared), all of A."""
    out = dict(tensors)
    for key, (fused_key, start, stop) in fused_rows(cfg).items():
        stem = PREFIX + cfg.module_name(key.rsplit(".", 1)[0])
        fused_stem = PREFIX + cfg.module_name(fused_key.rsplit(".", 1)[0])
        a, b = tensors.get(f"{fused_stem}.lora_A.weight"), tensors.get(f"{fused_stem}.lora_B.weight")
        if a is None or b is None or not key.endswith(".weight"):
            continue
        parts = next(parts for fused, parts in cfg.family.fused if fused_stem.endswith("." + fused))
        part = parts.index(stem.rsplit(".", 1)[1])
        cols = slice(part * rank, (part + 1) * rank) if a.shape[0] == len(parts) * rank else slice(None)
        out[f"{stem}.lora_A.weight"] = a[cols]
        out[f"{stem}.lora_B.weight"] = b[start:stop, cols]
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
    # A fused module's adapter: raysft's (rank and alpha n times the run's), or PEFT's own.
    ranks, alphas = _fused_patterns(lora, cfg)
    expert_ranks, expert_alphas = peft_patterns(lora.modules, lora.rank, lora.alpha)
    ranks, alphas = {**ranks, **expert_ranks}, {**alphas, **expert_alphas}
    for module, rank in ranks.items():
        found = ((config.get("rank_pattern") or {}).get(module, lora.rank),
                 (config.get("alpha_pattern") or {}).get(module, lora.alpha))
        if found not in ((lora.rank, lora.alpha), (rank, alphas[module])):
            return (f"{module} has rank {found[0]} and alpha {found[1]}, this run's lora_rank is {lora.rank}, "
                    f"lora_alpha {lora.alpha}")
    if config.get("r") != lora.rank:
        return f"rank r={config.get('r')}, this run's lora_rank is {lora.rank}"
    if float(config.get("lora_alpha", 8)) != float(lora.alpha):
        return f"lora_alpha {config.get('lora_alpha')}, this run's lora_alpha is {lora.alpha}"
    targets = config.get("target_modules") or []
    try:
        modules = resolve_modules(targets, cfg) if targets else ()
    except ValueError as err:
        return str(err)
    parameters = config.get("target_parameters") or []
    modules += tuple(f"experts.{part}" for target in parameters for part in (
        ("gate_proj", "up_proj") if target.endswith("gate_up_proj") else ("down_proj",)))
    if set(modules) != set(lora.modules):
        return f"target modules {sorted(modules)}, this run's lora_target_modules adapt {sorted(lora.modules)}"
    return None
