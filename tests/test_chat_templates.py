"""The chat templates of the model families people fine-tune, as published (template text
in `chat_templates/`, see its README), each with the exact text trained per assistant
turn written out by hand: one conversation with a system prompt and two exchanges, and
Qwen3's reasoning and tool-call forms. Through the row store with packing on and off for
the templates that do not render incrementally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raysft.data.encode import Encoder
from raysft.storage.errors import BadRow
from raysft.data.formats import to_example
from raysft.data.prepare import prepare_dataset
from raysft.data.settings import DataSettings
from conftest import train_tokenizer, write_jsonl
from test_data_formats import trained_runs

TEMPLATES = Path(__file__).parent / "chat_templates"

# (bos, eos, the template's other special tokens), as each family's tokenizer has them.
FAMILIES = {
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "llama-3.2": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>", "<tool_call>", "</tool_call>"]),
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                                    "<tool_response>", "</tool_response>"]),
    "mistral-v0.3": ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "gemma-2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma-3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi-3.5": (None, "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi-4": (None, "<|im_end|>", ["<|im_start|>", "<|im_sep|>"]),
    "smollm2": ("<|im_start|>", "<|im_end|>", []),
    "deepseek-r1-distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>", "<think>",
                                                                             "</think>"]),
}

SYSTEM = {"role": "system", "content": "be brief"}
EXCHANGES = [
    {"role": "user", "content": "the cat?"},
    {"role": "assistant", "content": "sat on the mat"},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "on the log"},
]

# What each family trains of SYSTEM + EXCHANGES: every assistant turn with its end of turn.
# Qwen3 writes a (here empty) think block into the last turn only; Mistral's first token
# of an answer carries the space the template puts after [/INST]; Phi-3.5 ends the
# conversation with EOS after the last turn.
TRAINED = {
    "llama-3.1": ["sat on the mat<|eot_id|>", "on the log<|eot_id|>"],
    "llama-3.2": ["sat on the mat<|eot_id|>", "on the log<|eot_id|>"],
    "qwen2.5": ["sat on the mat<|im_end|>\n", "on the log<|im_end|>\n"],
    "qwen3": ["sat on the mat<|im_end|>\n", "<think>\n\n</think>\n\non the log<|im_end|>\n"],
    "mistral-v0.3": [" sat on the mat</s>", " on the log</s>"],
    "gemma-2": ["sat on the mat<end_of_turn>\n", "on the log<end_of_turn>\n"],
    "gemma-3": ["sat on the mat<end_of_turn>\n", "on the log<end_of_turn>\n"],
    "phi-3.5": ["sat on the mat<|end|>\n", "on the log<|end|>\n<|endoftext|>"],
    "phi-4": ["sat on the mat<|im_end|>", "on the log<|im_end|>"],
    "smollm2": ["sat on the mat<|im_end|>\n", "on the log<|im_end|>\n"],
    "deepseek-r1-distill": ["sat on the mat<｜end▁of▁sentence｜>", "on the log<｜end▁of▁sentence｜>"],
}
NO_SYSTEM_ROLE = {"gemma-2"}  # its template raises on a system message
# Llama 3.2 writes today's date into the system prompt unless the caller fixes it.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def family_tokenizer(name: str, out: Path):
    """The test tokenizer with the family's special tokens and its published template."""
    tokenizer = train_tokenizer(out)
    bos, eos, extra = FAMILIES[name]
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in (bos, eos, *extra) if t]})
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    tokenizer.save_pretrained(out)
    return tokenizer


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    return {name: family_tokenizer(name, tmp_path_factory.mktemp(name)) for name in FAMILIES}


def trained(tokenizer, messages, **template_kwargs) -> list[str]:
    settings = DataSettings(seq_len=1024, chat_template_kwargs={**TEMPLATE_KWARGS, **template_kwargs})
    example = to_example({"messages": messages}, "messages", "text", "chat.jsonl: row 1")
    (ids, weights), = Encoder(tokenizer, settings).encode(example, "chat.jsonl: row 1").pieces
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **TEMPLATE_KWARGS, **template_kwargs)
    assert tokenizer.decode(ids) == rendered  # every token of the rendering, nothing else
    return trained_runs(tokenizer, ids, weights)


def test_every_published_template_is_tested():
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(FAMILIES) == sorted(TRAINED)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_assistant_turn_trains_its_text_and_end_of_turn(family_tokenizers, family):
    tokenizer = family_tokenizers[family]
    if family not in NO_SYSTEM_ROLE:
        assert trained(tokenizer, [SYSTEM, *EXCHANGES]) == TRAINED[family]
    assert trained(tokenizer, EXCHANGES) == TRAINED[family]


def _assistant(content: str, **fields) -> dict:
    return {"role": "assistant", "content": content, **fields}


LOOK = [{"type": "function", "function": {"name": "look", "arguments": {"at": "cat"}}}]
LOOK_CALL = '<tool_call>\n{"name": "look", "arguments": {"at": "cat"}}\n</tool_call><|im_end|>\n'
QWEN3 = {
    # Reasoning of earlier turns is dropped by the template: only the last keeps its block.
    "reasoning_content": (
        [EXCHANGES[0], _assistant("sat on the mat", reasoning_content="cats sit"), EXCHANGES[2],
         _assistant("on the log", reasoning_content="dogs sit too")],
        ["sat on the mat<|im_end|>\n", "<think>\ndogs sit too\n</think>\n\non the log<|im_end|>\n"],
        ["sat on the mat<|im_end|>\n", "dogs sit too\n</think>\n\non the log<|im_end|>\n"],
    ),
    "reasoning_inline": (
        [EXCHANGES[0], _assistant("<think>\ncats sit\n</think>\n\nsat on the mat"), EXCHANGES[2],
         _assistant("<think>\ndogs sit too\n</think>\n\non the log")],
        ["sat on the mat<|im_end|>\n", "<think>\ndogs sit too\n</think>\n\non the log<|im_end|>\n"],
        ["sat on the mat<|im_end|>\n", "dogs sit too\n</think>\n\non the log<|im_end|>\n"],
    ),
    "tool_call": (
        [EXCHANGES[0], _assistant("", tool_calls=LOOK), {"role": "tool", "content": "on the mat"},
         _assistant("sat on the mat")],
        [LOOK_CALL, "<think>\n\n</think>\n\nsat on the mat<|im_end|>\n"],
        [LOOK_CALL, "sat on the mat<|im_end|>\n"],
    ),
    # A turn after the last user message keeps its reasoning even when not last.
    "tool_call_reasoning": (
        [EXCHANGES[0], _assistant("", tool_calls=LOOK, reasoning_content="look first"),
         {"role": "tool", "content": "on the mat"}, _assistant("sat on the mat")],
        ["<think>\nlook first\n</think>\n\n" + LOOK_CALL, "<think>\n\n</think>\n\nsat on the mat<|im_end|>\n"],
        ["look first\n</think>\n\n" + LOOK_CALL, "sat on the mat<|im_end|>\n"],
    ),
}


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no_thinking"])
@pytest.mark.parametrize("case", sorted(QWEN3))
def test_qwen3_reasoning_and_tool_calls(family_tokenizers, case, thinking):
    """With `enable_thinking` off the generation prompt holds an (empty) think block, so
    whatever of a think block the prompt already opens is not trained."""
    messages, with_thinking, without = QWEN3[case]
    expected = with_thinking if thinking else without
    assert trained(family_tokenizers["qwen3"], messages, enable_thinking=thinking) == expected


def test_deepseek_r1_trains_the_answer_its_template_keeps(family_tokenizers):
    """R1's template drops the reasoning of every turn, the last too."""
    messages = [EXCHANGES[0], _assistant("<think>\ncats sit\n</think>\n\nsat on the mat")]
    assert trained(family_tokenizers["deepseek-r1-distill"], messages) == ["\n\nsat on the mat<｜end▁of▁sentence｜>"]


def test_turn_the_template_drops_is_an_error_naming_row_and_turn(family_tokenizers):
    tokenizer = family_tokenizers["qwen2.5"]
    original = tokenizer.chat_template
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' or loop.last %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        with pytest.raises(BadRow, match=r"chat.jsonl: row 1: turn 1 \(assistant\): its text cannot be located"):
            trained(tokenizer, EXCHANGES)
    finally:
        tokenizer.chat_template = original


def test_packed_and_unpacked_rows_train_the_same_text(local_ray, tmp_path, family_tokenizers):
    """The loss weights that reach the rows, packed or not, hold the hand-written text of
    every turn of every conversation (TRL once dropped assistant masks under packing)."""
    tokenizer = family_tokenizers["qwen3"]
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    cases = [([SYSTEM, *EXCHANGES], TRAINED["qwen3"])] + [(messages, runs) for messages, runs, _ in QWEN3.values()]
    rows = [{"messages": messages} for messages, _ in cases] * 3
    expected = sorted(tuple(runs) for _, runs in cases * 3)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    for packing in (False, True):
        settings = DataSettings(seq_len=256, packing=packing)
        store = prepare_dataset(data, tokenizer_dir, settings, tmp_path / "store", report=None)
        read = store.read(np.arange(store.num_rows))
        runs = []
        for ids, weights, segments in zip(read["input_ids"], read["loss_weights"], read["segment_ids"]):
            for segment in np.unique(segments[segments > 0]):
                at = segments == segment
                runs.append(tuple(trained_runs(tokenizer, ids[at], weights[at])))
        assert sorted(runs) == expected, packing
        assert (store.num_rows < len(rows)) == packing
