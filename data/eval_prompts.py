"""What the model answers at every eval: the first rows of the eval set, each without its
last answer (kept as the reference the answer is compared with)."""

from __future__ import annotations

from typing import Any

from ray.data.expressions import col

from raysft.data import mixture, sources
from raysft.data.formats import Example, detect_format
from raysft.data.readers import FILE_INDEX, ROW_NUMBER
from raysft.data.tokenize import row_example
from raysft.storage.errors import DataError


def eval_prompts(
    eval_dataset: Any, count: int, text_field: str, dataset_format: str, hub_options: dict | None = None,
) -> list[dict]:
    """`count` prompts from the eval set's first rows, in dataset order (a dict of eval
    sources: from each in turn until there are enough): `{"messages" | "text", "tools",
    "reference", "source", "where"}` (see `workers.generation.text_generation`)."""
    prompts: list[dict] = []
    for part in mixture.parts(eval_dataset, "eval_dataset"):
        if len(prompts) >= count:
            break
        source = sources.resolve(part.source, hub_options)
        fmt = detect_format(source.columns, text_field, dataset_format, source.name)
        for row, where in _first_rows(source, count - len(prompts)):
            prompt = split_answer(row_example(row, fmt, text_field, where), where)
            prompts.append({**prompt, "source": part.name, "where": where})
    return prompts


def split_answer(example: Example, where: str) -> dict:
    """The prompt before the last answer, and that answer."""
    if example.messages is not None:
        last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        return {"messages": example.messages[:last], "tools": example.tools,
                "reference": example.messages[last]["content"]}
    if isinstance(example.prompt, list):
        answer = next(m for m in example.completion if m["role"] == "assistant")
        return {"messages": example.prompt, "tools": example.tools, "reference": answer["content"]}
    if example.prompt is not None:
        return {"text": example.prompt, "reference": example.completion}
    raise DataError(
        f"{where}: generate_during_eval needs rows with a prompt and an answer (conversations, prompt/completion or "
        "instruction rows); plain text and tokenized rows have none: set generation_prompts instead"
    )


def _first_rows(source: sources.Source, count: int) -> list[tuple[dict, str]]:
    """The first `count` rows of a source with where each is, in the dataset's order
    (numbered sources; others in the order Ray Data reads them)."""
    dataset = source.read()
    if source.numbered:
        rows = dataset.filter(expr=col(ROW_NUMBER) <= count).take_all()  # each file's first rows
        rows.sort(key=lambda r: (r[FILE_INDEX] or 0, r[ROW_NUMBER]))
    else:
        rows = dataset.take(count)
    rows = rows[:count]
    if not rows:
        raise DataError(f"{source.name}: the eval set has no rows to take generation prompts from")
    where = lambda r: f"{source.parts[r.get(FILE_INDEX) or 0]}: row {r[ROW_NUMBER]}" if ROW_NUMBER in r else source.name  # noqa: E731
    return [(row, where(row)) for row in rows]

