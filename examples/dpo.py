"""Preference-tune SmolLM2-135M-Instruct with DPO on pairs built from the bundled
unit-conversion chats, on 2 local hosts: the chosen answer is the bundled one, the rejected
one has its units swapped (the mistake a converter must never make).

Runs as `make dpo`, from the model `make demo` fine-tuned (its export) when there is one,
else from the base model. Before training, the reference model's log-probabilities of every
pair are computed once and stored beside the prepared rows; the eval's reward accuracy
(how often the policy moved the chosen answer above the rejected one, relative to the
reference) starts at 0 and rises.
"""

from __future__ import annotations

import json
from pathlib import Path

import raysft as rs
from demo import smollm2_gguf

HERE = Path(__file__).parent
SFT_EXPORT = Path("runs") / "smollm2-unit-conversions" / "export"


def preference_pairs(chats: Path, out: Path, limit: int | None = None) -> Path:
    """Conversational pairs: the prompt is the system and user turns, the chosen answer the
    bundled one, the rejected one the same JSON with "from" and "to" swapped."""
    rows = []
    for line in chats.read_text().splitlines()[:limit]:
        messages = json.loads(line)["messages"]
        answer = json.loads(messages[-1]["content"])
        swapped = {**answer, "from": answer["to"], "to": answer["from"]}
        rows.append({
            "prompt": messages[:-1],
            "chosen": [messages[-1]],
            "rejected": [{"role": "assistant", "content": json.dumps(swapped)}],
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def main() -> None:
    config = rs.DPOConfig.from_yaml(HERE / "dpo.yaml")
    model = SFT_EXPORT if (SFT_EXPORT / "config.json").is_file() else smollm2_gguf()
    print(f"policy and reference: {model}")
    pairs = config.run_dir / "pairs"
    output = rs.DPOTrainer(
        arguments=config,
        model=model,
        # 96 of the 288 chats: the 8 steps below take 64; the reference pass covers them all.
        train_dataset=preference_pairs(HERE / "data" / "unit_conversions_train.jsonl", Path(pairs / "train.jsonl"), 96),
        eval_dataset=preference_pairs(HERE / "data" / "unit_conversions_eval.jsonl", Path(pairs / "eval.jsonl")),
    ).train()
    summary = output.summary
    before, after = summary["eval_start"], summary["eval_end"]
    print(f"\nheld-out pairs, step {summary['start_step']} -> {summary['final_step']}:")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        print(f"  {key:<20} {before[key]:>9.4f} -> {after[key]:.4f}")
    print(f"exported Hugging Face model: {output.export_dir}")


if __name__ == "__main__":
    main()
