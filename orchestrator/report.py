"""The run report: `report/metrics.jsonl`, `report/summary.json`, PNG plots of the train
and eval loss, the learning rate and tokens/s against the step (a preference run's rewards
and reward accuracy too), and with eval prompts
the answers at every eval (`generations.jsonl`, and `generations.md` to read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOTS = {
    "loss.png": ("loss", [("step", "loss", "train"), ("eval", "loss", "eval")]),
    "learning_rate.png": ("learning rate", [("step", "learning_rate", "learning rate")]),
    "tokens_per_second.png": ("tokens/s (real, padding excluded)", [("step", "tokens_per_second", "tokens/s")]),
}


def write_report(report_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> list[Path]:
    """Write the report; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a head node or in a job
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "metrics.jsonl", report_dir / "summary.json"]
    written[0].write_text("".join(json.dumps(r) + "\n" for r in records))
    written[1].write_text(json.dumps(summary, indent=2))
    generations = [r for r in records if r["event"] == "generations"]
    if generations:
        written += write_generations(report_dir, generations)
    for file, (title, series) in plots(records).items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for event, key, label in series:
            points = _last_per_step([r for r in records if r["event"] == event and key in r])
            if points:
                ax.plot([r["step"] for r in points], [r[key] for r in points], marker="o" if event == "eval" else None,
                        markersize=4, label=label)
        ax.set(title=f"{summary.get('model_name', '')} {title}".strip(), xlabel="step", ylabel=title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(report_dir / file, dpi=100)
        plt.close(fig)
        written.append(report_dir / file)
    return written


def plots(records: list[dict[str, Any]]) -> dict[str, tuple[str, list[tuple[str, str, str]]]]:
    """PLOTS, with the per-source eval losses of an eval_dataset dict on the loss plot."""
    sources = sorted({key for r in records if r["event"] == "eval" for key in r if key.startswith("eval_loss/")})
    out = dict(PLOTS, **{"loss.png": ("loss", PLOTS["loss.png"][1] + [("eval", key, key) for key in sources])})
    if any("rewards/accuracies" in r for r in records):  # a preference run: TRL's reward curves
        out["rewards.png"] = ("reward", [(event, f"rewards/{key}", f"{label} {key}") for event, label in
                                         (("step", "train"), ("eval", "eval")) for key in ("chosen", "rejected", "margins")])
        out["reward_accuracy.png"] = ("reward accuracy", [("step", "rewards/accuracies", "train"),
                                                          ("eval", "rewards/accuracies", "eval")])
    return out


def _last_per_step(records: list[dict]) -> list[dict]:
    """A restarted run reports some steps twice; the plot shows the run that counted."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def write_generations(report_dir: Path, records: list[dict[str, Any]]) -> list[Path]:
    """One JSON line per answer, and a page per prompt with its answer at every eval."""
    lines = [json.dumps({"step": r["step"], **sample}) for r in records for sample in r["samples"]]
    (report_dir / "generations.jsonl").write_text("".join(line + "\n" for line in lines))
    page = ["# Answers at every eval", ""]
    scores = [f"step {r['step']}: {r['exact_match']:.3f}" for r in records if "exact_match" in r]
    if scores:
        page += ["Exact match (normalised answer = reference): " + ", ".join(scores), ""]
    for i, first in enumerate(records[0]["samples"]):
        page += [f"## {i + 1}. {first['prompt']}", ""]
        if "reference" in first:
            page += [f"**Reference:** {first['reference']}", ""]
        for r in records:
            sample = r["samples"][i]
            mark = {True: " (exact)", False: ""}.get(sample.get("exact_match"), "")
            page += [f"**Step {r['step']}{mark}:** {sample['answer']}", ""]
    (report_dir / "generations.md").write_text("\n".join(page))
    return [report_dir / "generations.jsonl", report_dir / "generations.md"]
