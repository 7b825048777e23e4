"""Will it fit? Full fine-tuning of public model shapes on TPU slices, answered by the TPU
compiler on this CPU machine (`raysft plan`), plus two figures the plan stands on:
sequence parallelism's memory and the export's memory, both from compiled programs.

    python benchmarks/tpu_plan.py [--sections table,sp,export,lora,moe] [--models Llama-3.1-8B] [--slices v5p-16]

Each table cell is `rs.plan` of one run: T = 4096, 32 sequences per step, bf16 compute,
fp32 parameters and AdamW, scanned layers, splash attention, starting with no remat and
one micro-batch; when that does not fit, the plan's search names the smallest change that
does (remat policy, micro-batches, fsdp/tp split, bf16 parameters). Model shapes come
from the models' published config.json files in `benchmarks/model_configs/` (no weights).
Needs libtpu (`pip install 'raysft[tpu]'`); about an hour on a 2-core machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.plan import plan, plan_spec
from raysft.workers.runtime.chips import GiB
from raysft.workers.training.compiled_run import CompiledRun

CONFIGS = Path(__file__).parent / "model_configs"
MODELS = ["Llama-3.2-1B", "Llama-3.1-8B", "Qwen2.5-7B", "Gemma-2-9B", "Gemma-3-27B", "Llama-3.1-70B"]
# Mixtures of experts have their own section (`moe`): their meshes and remat differ per cell.
SLICES = ["v4-16", "v5litepod-16", "v5p-16", "v5p-64", "v6e-16"]
RUN = dict(
    max_sequence_length=4096, total_batch_size=32, dtype="bfloat16", param_dtype="float32", scan_layers=True,
    gradient_checkpointing="none",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="tpu_plan.py")

    sections: list[str] = ["table", "sp", "export", "lora", "moe"]
    models: list[str] = MODELS
    slices: list[str] = SLICES
    estimate: bool = False  # the cost model's step time too (2 more compiles per fitting cell)


def cell(model: str, tpu_type: str, estimate: bool) -> dict:
    started = time.perf_counter()
    result = plan(SFTConfig(tpu_type=tpu_type, **RUN), CONFIGS / model, evaluate=False, estimate=estimate)
    chosen = result.config.model_copy(update=dict(result.fix.updates)) if result.fix else result.config
    fits = result.fits or result.fix is not None
    # What fits; or, when nothing does, the least any compiled candidate needed.
    least = min([result.total] + [total for _, total in result.tried])
    out = {
        "fits": fits,
        "gib_per_chip": round((result.total if result.fits else result.fix_total or least) / GiB, 2),
        "change": result.fix.describe() if result.fix else "",
        "remat": chosen.gradient_checkpointing if fits else "",
        "micro_batches": chosen.gradient_accumulation_steps if fits else "",
        "mesh": "x".join(map(str, chosen.sharding_axis_dims)) if fits else "",
        "param_dtype": chosen.param_dtype if fits else "",
        "seconds": round(time.perf_counter() - started, 1),
        "compiles": 1 + len(result.tried),
    }
    if result.estimate is not None:
        out["tokens_per_s_per_chip"] = round(result.estimate.tokens_per_second_per_device)
    print(json.dumps({"model": model, "slice": tpu_type, **out}), flush=True)
    return out


def table(settings: Settings) -> dict:
    cells = {f"{m} on {s}": cell(m, s, settings.estimate) for m in settings.models for s in settings.slices}
    print(f"\n| model | {' | '.join(settings.slices)} |\n|---|{'---|' * len(settings.slices)}")
    for m in settings.models:
        row = []
        for s in settings.slices:
            c = cells[f"{m} on {s}"]
            row.append(
                f"{c['gib_per_chip']} GiB, {c['remat']}, {c['micro_batches']} mb"
                + (f", {c['param_dtype']} params" if c["param_dtype"] == "bfloat16" else "")
                + (f", tp {c['mesh'].split('x')[2]}" if c["mesh"] and c["mesh"].split("x")[2] != "1" else "")
                + f" ({c['seconds']:.0f} s)"
                if c["fits"] else f"no (least tried: {c['gib_per_chip']} GiB; {c['seconds']:.0f} s)"
            )
        print(f"| {m} | {' | '.join(row)} |")
    return cells


def compiled(model: str, with_export: bool = False, **settings) -> CompiledRun:
    config = SFTConfig(**{**RUN, **settings})
    return CompiledRun.compile(
        plan_spec(config, CONFIGS / model), config.tpu_slice.compile_devices(), with_eval=False, with_export=with_export
    )


def sequence_parallel() -> dict:
    """Llama-3.1-8B, rows of 32,768 tokens on v5p-16 (8 chips), one row per data shard:
    sp=1 (fsdp 8, 8 rows) against sp=4 (fsdp 2 x sp 4, 2 rows)."""
    out = {}
    for name, dims, rows in (("sp1", (1, 8, 1, 1), 8), ("sp4", (1, 2, 1, 4), 2)):
        run = compiled("Llama-3.1-8B", tpu_type="v5p-16", sharding_axis_dims=dims, total_batch_size=rows,
                       max_sequence_length=32768, gradient_checkpointing="nothing_saveable")
        out[name] = {"temp_gib": round(run.train.temp / GiB, 2), "total_gib": round(run.train.total / GiB, 2),
                     "params_gib": round(run.param_bytes / GiB, 2)}
    out["temp_ratio"] = round(out["sp1"]["temp_gib"] / out["sp4"]["temp_gib"], 2)
    print(json.dumps({"sequence_parallel": out}), flush=True)
    return out


def export() -> dict:
    """Llama-3.1-70B on v5p-64: the export's memory per chip (all shards plus the largest
    one-layer gather) against the train step's."""
    run = compiled("Llama-3.1-70B", with_export=True, tpu_type="v5p-64", gradient_checkpointing="nothing_saveable",
                   export_dtype="bfloat16")
    out = {"train_total_gib": round(run.train.total / GiB, 2), "export_total_gib": round(run.export.total / GiB, 2),
           "largest_gather_gib": round(run.export_largest_gather / GiB, 3),
           "train_refused_for_memory": run.train.out_of_memory}
    print(json.dumps({"export": out}), flush=True)
    return out


def lora() -> dict:
    """Llama-3.1-8B at T = 4096 on v5e-8 (16 GiB per chip), 8 rows a step, full remat:
    full fine-tuning (fp32 or bf16 parameters, AdamW) against LoRA r=16 on every linear
    projection over a bf16 base (fp32 adapters and their AdamW state), and QLoRA over an
    int8 or nf4 base (also on v5e-4, 4 rows a step)."""
    out = {}
    common = dict(tpu_type="v5litepod-8", total_batch_size=8, gradient_checkpointing="nothing_saveable")
    for name, settings in (
        ("full, fp32 params", {}),
        ("full, bf16 params", {"param_dtype": "bfloat16"}),
        ("LoRA r=16, bf16 base", {"param_dtype": "bfloat16", "use_lora": True, "lora_rank": 16}),
        ("QLoRA r=16, int8 base", {"param_dtype": "bfloat16", "use_lora": True, "lora_rank": 16, "quantize_base": "int8"}),
        ("QLoRA r=16, nf4 base", {"param_dtype": "bfloat16", "use_lora": True, "lora_rank": 16, "quantize_base": "nf4"}),
        ("QLoRA r=16, nf4 base, v5e-4", {"param_dtype": "bfloat16", "use_lora": True, "lora_rank": 16,
                                          "quantize_base": "nf4", "tpu_type": "v5litepod-4", "total_batch_size": 4}),
    ):
        run = compiled("Llama-3.1-8B", **{**common, **settings})
        out[name] = {
            "params_gib": round(run.param_bytes / GiB, 2), "optimizer_gib": round(run.optimizer_bytes / GiB, 3),
            "total_gib": round(run.train.total / GiB, 2), "refused_for_memory": run.train.out_of_memory,
            "compile_s": round(run.train.compile_s),
        }
        print(json.dumps({"lora": {name: out[name]}}), flush=True)
    print("\n| Llama-3.1-8B, v5e-8, T = 4096 | parameters | optimizer state | peak per chip (16 GiB) |\n|---|---|---|---|")
    for name, c in out.items():
        peak = f"{c['total_gib']} GiB" + (" (refused: does not fit)" if c["refused_for_memory"] else "")
        print(f"| {name} | {c['params_gib']} GiB | {c['optimizer_gib']} GiB | {peak} |")
    return out


GATHERED = {"moe_expert_parallel": False}  # experts' weights gathered per layer, tokens kept
EXPERTS_LORA = {"use_lora": True, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]}
MOE_CELLS = (  # (model, slice, run, settings over RUN): the settings that fit, or what was asked
    ("Qwen3-30B-A3B", "v5p-16", "full", {**GATHERED, "gradient_checkpointing": "dots_with_no_batch_dims_saveable"}),
    ("Qwen3-30B-A3B", "v5p-16", "full, expert parallel", {"gradient_checkpointing": "nothing_saveable"}),
    ("Qwen3-30B-A3B", "v5p-16", "LoRA",
     {**EXPERTS_LORA, **GATHERED, "gradient_checkpointing": "dots_with_no_batch_dims_saveable"}),
    ("Qwen3-30B-A3B", "v5p-16", "LoRA, expert parallel",
     {**EXPERTS_LORA, "gradient_checkpointing": "dots_with_no_batch_dims_saveable"}),
    ("Qwen3-30B-A3B", "v5litepod-16", "full", {}),
    ("Qwen3-30B-A3B", "v5litepod-16", "LoRA", EXPERTS_LORA),
    ("Qwen3-30B-A3B", "v5litepod-16", "LoRA, capacity 1.25, bf16 base",
     {**EXPERTS_LORA, "moe_capacity_factor": 1.25, "param_dtype": "bfloat16"}),
    ("Mixtral-8x7B", "v5p-32", "full",
     {"sharding_axis_dims": (1, 8, 2, 1), "gradient_checkpointing": "dots_with_no_batch_dims_saveable"}),
)


def moe() -> dict:
    """Mixtures of experts (dropless unless a cell sets a capacity factor): memory per chip
    and, where it fits and the chip's cost model answers, the step estimate and the MFU it
    implies on the FLOPs of what a token uses (its router and k experts)."""
    out = {}
    for model, tpu_type, run, settings in MOE_CELLS:
        started = time.perf_counter()
        result = plan(SFTConfig(tpu_type=tpu_type, **{**RUN, **settings}), CONFIGS / model, evaluate=False)
        least = min([result.total] + [total for _, total in result.tried])
        cell = {
            "fits": result.fits, "gib_per_chip": round((result.total if result.fits else result.fix_total or least) / GiB, 2),
            "change": result.fix.describe() if result.fix else "", "mfu": result.estimated_mfu,
            "tokens_per_s_per_chip": result.estimate and round(result.estimate.tokens_per_second_per_device),
            "step_s": result.estimate and round(result.estimate.seconds, 3), "seconds": round(time.perf_counter() - started),
        }
        out[f"{model} on {tpu_type}, {run}"] = cell
        print(json.dumps({"moe": {f"{model} on {tpu_type}, {run}": cell}}), flush=True)
    return out


def main() -> None:
    settings = Settings()
    result = {"benchmark": "tpu_plan"}
    sections = (("table", table), ("sp", lambda s: sequence_parallel()), ("export", lambda s: export()),
                ("lora", lambda s: lora()), ("moe", lambda s: moe()))
    for section, run in sections:
        if section in settings.sections:
            result[section] = run(settings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
