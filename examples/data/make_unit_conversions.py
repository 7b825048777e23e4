"""Writes the demo's chats: unit-conversion requests, phrased many ways, answered with one
line of JSON naming the value and the two units as the request wrote them (what a tool
call would take). A format the base model cannot guess, with nothing to compute: a
135M-parameter model learns it in a few steps, and exact match shows it.

    python examples/data/make_unit_conversions.py   # rewrites unit_conversions_{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You turn unit-conversion requests into JSON for the converter."
# (from, to) as people write them; the eval file asks about pairs the training file never shows.
TRAIN_PAIRS = [
    ("kilometres", "metres"), ("metres", "centimetres"), ("kilograms", "grams"), ("litres", "millilitres"),
    ("hours", "minutes"), ("minutes", "seconds"), ("feet", "inches"), ("weeks", "days"), ("days", "hours"),
    ("yards", "feet"), ("pounds", "ounces"), ("gallons", "quarts"), ("tonnes", "kilograms"), ("miles", "yards"),
]
EVAL_PAIRS = [("metres", "millimetres"), ("centimetres", "millimetres"), ("years", "months"), ("quarts", "pints")]
PHRASINGS = [
    "Convert {v} {a} to {b}.",
    "What is {v} {a} in {b}?",
    "How many {b} are in {v} {a}?",
    "{v} {a} is how many {b}?",
    "Please express {v} {a} in {b}.",
    "I have {v} {a}. How much is that in {b}?",
    "Could you tell me what {v} {a} comes to in {b}?",
    "{v} {a} to {b}, please.",
]


def chat(rng: random.Random, pairs: list[tuple[str, str]]) -> dict:
    a, b = rng.choice(pairs)
    value = rng.choice([rng.randint(2, 99), rng.randint(100, 5000), round(rng.uniform(0.5, 50), 1)])
    question = rng.choice(PHRASINGS).format(v=value, a=a, b=b)
    answer = json.dumps({"value": value, "from": a, "to": b})
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(0)
    for name, pairs, count in (("train", TRAIN_PAIRS, 288), ("eval", EVAL_PAIRS + TRAIN_PAIRS[:4], 32)):
        rows = [chat(rng, pairs) for _ in range(count)]
        (here / f"unit_conversions_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
