"""W1 through the path users run, `rs.SFTTrainer` (Ray workers, `jax.distributed`, the
mesh over every device, the row store, the metrics), in several layouts of this machine,
against the plain PyTorch loop and the bare jitted step of `train_throughput.py`, all in
one run: what the trainer costs over its own step, and how it stands against PyTorch.

W1 as in `train_throughput.py` (Llama 256/768, 4 layers, 8 heads, 4 KV heads, vocab
49,152, tied, T = 512, batch 8, packed by global BFD, fp32, random init); the documents
are the same, given to the trainer pre-tokenized. A layout is hosts x CPU devices per
host (`num_hosts` x `cpu_devices_per_host`): 1x2 is one worker with the machine's cores
as two devices, 2x1 two workers of one device each. Throughput is the trainer's own
metric (real tokens over wall time between log steps, one host sync per window of
`--window` steps, as in a user's run) after the first window, which holds the compilation.

    python benchmarks/trainer_throughput.py [--steps 12] [--window 6] [--layouts 1x1,1x2,2x1,2x2]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.workers.runtime.xla_cpu import run_as_cpu_worker

from train_throughput import W1, Settings as BareSettings, packed_batches, run_pytorch, run_raysft


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="trainer_throughput.py")

    steps: int = 12
    window: int = 6  # log_steps: the trainer syncs with the host once per window, as a user's run does
    layouts: str = "1x1,1x2,2x1,2x2"


def documents(bare: BareSettings) -> list[np.ndarray]:
    """The documents `packed_batches` packs, in its order."""
    rng = np.random.default_rng(0)
    rows_needed = (bare.steps + bare.warmup_steps) * bare.batch_size
    lengths = np.clip(rng.lognormal(np.log(150), 0.9, rows_needed * 6).astype(int), 8, bare.seq_len)
    return [rng.integers(3, W1["vocab_size"], n).astype(np.int32) for n in lengths]


def write_inputs(root: Path, docs: list[np.ndarray]) -> tuple[Path, Path]:
    """A random-init W1 in Hugging Face layout with a word-level tokenizer (the rows are
    pre-tokenized; the tokenizer only names pad and EOS), and the rows as JSON lines."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data = root / "w1", root / "w1.jsonl"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**W1)).save_pretrained(model_dir)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(model_dir)
    with data.open("w") as f:
        for doc in docs:  # the first token is not trained, as in `packed_batches`
            f.write(json.dumps({"input_ids": doc.tolist(), "labels": [-100, *doc[1:].tolist()]}) + "\n")
    return model_dir, data


def run_trainer(model_dir: Path, data: Path, root: Path, hosts: int, devices: int, s: Settings, bare: BareSettings) -> dict:
    import raysft as rs

    config = rs.SFTConfig(
        model_name=f"w1-{hosts}x{devices}", save_directory=str(root / "runs"), num_hosts=hosts,
        cpu_devices_per_host=devices, max_sequence_length=bare.seq_len, total_batch_size=bare.batch_size, packing=True,
        max_training_steps=s.window + s.steps, log_steps=s.window, learning_rate=1e-4, scheduler="none",
        save_steps=None, do_last_save=False, dtype="float32", param_dtype="float32",
    )
    output = rs.SFTTrainer(arguments=config, model=str(model_dir), train_dataset=str(data), quiet=True).train()
    # The first window holds the compilation; the later ones are timed.
    steady = [r for r in output.metrics if r["event"] == "step" and r["step"] > s.window]
    seconds = sum(r["step_time_s"] * s.window for r in steady)
    tokens = sum(r["tokens_per_second"] * r["step_time_s"] * s.window for r in steady)
    return {"real_tokens_per_s": round(tokens / seconds, 1), "mfu": round(float(np.mean([r["mfu"] for r in steady])), 4)}


def main() -> None:
    run_as_cpu_worker()  # this process runs as raysft's CPU workers do, whatever it times
    s = Settings()
    bare = BareSettings(steps=s.steps, warmup_steps=2, _cli_parse_args=False)
    batches = packed_batches(bare)
    real_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches[bare.warmup_steps :])
    # PyTorch in two forms: plain causal attention over each row (its fastest: SDPA's
    # causal kernel, no mask built), and with each document's positions (which
    # transformers may turn into a per-document mask). The faster is the baseline.
    torch_forms = {form: real_tokens / run_pytorch(bare, batches, positions=form == "with_positions")
                   for form in ("causal", "with_positions")}
    baseline_form = max(torch_forms, key=torch_forms.get)
    baseline = torch_forms[baseline_form]
    bare_step = real_tokens / run_raysft(bare, batches)
    with tempfile.TemporaryDirectory(prefix="raysft-trainer-bench-") as tmp:
        root = Path(tmp)
        model_dir, data = write_inputs(root, documents(bare))
        layouts = {}
        for layout in s.layouts.split(","):
            hosts, devices = map(int, layout.split("x"))
            layouts[layout] = run_trainer(model_dir, data, root, hosts, devices, s, bare)
    for result in layouts.values():
        result["ratio_over_pytorch"] = round(result["real_tokens_per_s"] / baseline, 3)
        result["ratio_over_bare_step"] = round(result["real_tokens_per_s"] / bare_step, 3)
    best = max(layouts, key=lambda name: layouts[name]["real_tokens_per_s"])
    print(json.dumps({
        "benchmark": "trainer_throughput W1 through SFTTrainer",
        "steps_timed": s.steps,
        "pytorch_real_tokens_per_s": {form: round(v, 1) for form, v in torch_forms.items()},
        "pytorch_baseline": baseline_form,
        "bare_step_real_tokens_per_s": round(bare_step, 1),
        "layouts_hosts_x_devices": layouts,
        "fastest_layout": best,
    }, indent=2))


if __name__ == "__main__":
    main()
