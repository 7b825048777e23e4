"""Each dataset format to tokens and loss mask, checked against hand-written expectations:
the trained tokens of every example, decoded, are exactly the text that should be learned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from raysft.data.encode import Encoder
from raysft.storage.errors import BadRow
from raysft.data.formats import detect_format, to_example
from raysft.data.settings import DataSettings

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat?"},
    {"role": "assistant", "content": "sat on the mat"},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "on the log"},
]
# What each template makes of CONVERSATION's assistant turns, end-of-turn token included.
ASSISTANT_TEXT = {
    "chatml": ["sat on the mat<|im_end|>\n", "on the log<|im_end|>\n"],
    "tagged": ["sat on the mat</s>", "on the log</s>"],
}


def trained_runs(tokenizer, ids, weights) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, weight in zip(ids, weights):
        if weight:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def encode(tokenizer, row, fmt, **settings):
    settings = DataSettings(**{"seq_len": 256, **settings})
    example = to_example(row, fmt, settings.text_field, "data.jsonl: row 1")
    return Encoder(tokenizer, settings).encode(example, "data.jsonl: row 1")


@pytest.fixture(scope="module")
def chat_tokenizers(chat_tokenizer_dirs):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in chat_tokenizer_dirs.items()}


@pytest.mark.parametrize("template", ["chatml", "tagged"])
def test_messages_train_every_assistant_turn_with_its_end_token(chat_tokenizers, template):
    tok = chat_tokenizers[template]
    (ids, weights), = encode(tok, {"messages": CONVERSATION}, "messages").pieces
    assert trained_runs(tok, ids, weights) == ASSISTANT_TEXT[template]
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)


@pytest.mark.parametrize("template", ["chatml", "tagged"])
def test_sharegpt_maps_speakers_to_roles(chat_tokenizers, template):
    tok = chat_tokenizers[template]
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    row = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    (ids, weights), = encode(tok, row, "sharegpt").pieces
    assert trained_runs(tok, ids, weights) == ASSISTANT_TEXT[template]


@pytest.mark.parametrize("template", ["chatml", "tagged"])
def test_train_on_inputs_trains_everything_but_the_first_token(chat_tokenizers, template):
    tok = chat_tokenizers[template]
    (ids, weights), = encode(tok, {"messages": CONVERSATION}, "messages", train_on_inputs=True).pieces
    assert weights[0] == 0 and weights[1:].all()


def test_prompt_completion_messages_train_only_the_completion(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    row = {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}
    (ids, weights), = encode(tok, row, "prompt_completion").pieces
    assert trained_runs(tok, ids, weights) == ["on the log<|im_end|>\n"]


def test_tools_reach_the_chat_template(tmp_path, chat_tokenizer_dirs):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dirs["chatml"])
    tok.chat_template = (
        "{% if tools %}[tools] {{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
        + tok.chat_template
    )
    row = {"messages": CONVERSATION[1:3], "tools": [{"name": "lookup"}, {"name": "sum"}]}
    (ids, weights), = encode(tok, row, "messages").pieces
    assert tok.decode(ids).startswith("[tools] lookup,sum\n")
    assert trained_runs(tok, ids, weights) == ["sat on the mat<|im_end|>\n"]


def test_tool_role_is_context_not_target(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    messages = [
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "lookup"},
        {"role": "tool", "content": "on the mat"},
        {"role": "assistant", "content": "sat on the mat"},
    ]
    (ids, weights), = encode(tok, {"messages": messages}, "messages").pieces
    assert trained_runs(tok, ids, weights) == ["lookup<|im_end|>\n", "sat on the mat<|im_end|>\n"]


def test_prompt_completion_strings(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    row = {"prompt": "question: the cat? answer: ", "completion": "on the mat"}
    (ids, weights), = encode(tok, row, "prompt_completion").pieces
    assert trained_runs(tok, ids, weights) == ["on the mat</s>"]
    (ids, weights), = encode(tok, row, "prompt_completion", completion_only_loss=False).pieces
    assert trained_runs(tok, ids, weights) == [tok.decode(ids[1:])]


@pytest.mark.parametrize(
    "row, prompt",
    [
        ({"instruction": "name a pet", "response": "the cat"}, "name a pet"),
        ({"instruction": "name a pet", "input": "not the dog", "output": "the cat"}, "name a pet\n\nnot the dog"),
    ],
    ids=["seed", "alpaca"],
)
def test_instruction_rows_train_the_response(tokenizer_dir, row, prompt):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (ids, weights), = encode(tok, row, "instruction").pieces
    assert tok.decode(ids) == prompt + "\n\nthe cat</s>"
    assert trained_runs(tok, ids, weights) == ["the cat</s>"]


def test_text_gets_one_eos_and_at_most_one_bos(tmp_path, tokenizer_dir):
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (ids, weights), = encode(tok, {"text": "the cat"}, "text").pieces
    assert tok.decode(ids) == "the cat</s>" and weights[0] == 0 and weights[1:].all()
    (ids, _), = encode(tok, {"text": "the cat</s>"}, "text").pieces
    assert ids.tolist().count(tok.eos_token_id) == 1
    # A tokenizer that adds BOS, on text that already starts with it.
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    (ids, _), = encode(tok, {"text": "<s>the cat"}, "text", add_special_tokens=True).pieces
    assert tok.decode(ids) == "<s>the cat</s>"
    (ids, _), = encode(tok, {"text": "the cat"}, "text", add_special_tokens=False).pieces
    assert tok.bos_token_id not in ids.tolist()


def test_pretokenized_rows_use_labels(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, -100]}
    (ids, weights), = encode(tok, row, "tokenized").pieces
    assert ids.tolist() == [5, 6, 7, 8, 9] and weights.tolist() == [0, 0, 1, 1, 0]
    (_, weights), = encode(tok, {"input_ids": [5, 6, 7]}, "tokenized").pieces
    assert weights.tolist() == [0, 1, 1]


def test_formatting_func(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = DataSettings(seq_len=64)
    example = to_example({"q": "the cat", "a": "sat"}, "text", "text", "w", formatting_func=lambda r: f"{r['q']} {r['a']}")
    (ids, _), = Encoder(tok, settings).encode(example, "w").pieces
    assert tok.decode(ids) == "the cat sat</s>"


def test_over_length_policies(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "the quick brown fox jumps over the lazy dog"
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    limit = len(full) // 2

    truncated = encode(tok, {"text": text}, "text", seq_len=limit)
    assert truncated.pieces[0][0].tolist() == full[:limit] and truncated.truncated_tokens == len(full) - limit

    split = encode(tok, {"text": text}, "text", seq_len=limit, truncation="split")
    assert np.concatenate([p for p, _ in split.pieces]).tolist() == full
    assert all(w[0] == 0 for _, w in split.pieces)  # a piece's first token has no context

    with pytest.raises(BadRow, match="over max_sequence_length") as err:
        encode(tok, {"text": text}, "text", seq_len=limit, truncation="drop")
    assert err.value.reason == "too_long"


def test_drop_turns_keeps_system_and_last_exchange(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    last = [CONVERSATION[0]] + CONVERSATION[3:]
    fits = len(tok.apply_chat_template(last, tokenize=True, return_dict=True)["input_ids"])
    out = encode(tok, {"messages": CONVERSATION}, "messages", seq_len=fits, truncation="drop_turns")
    (ids, weights), = out.pieces
    assert tok.decode(ids) == tok.apply_chat_template(last, tokenize=False)
    assert trained_runs(tok, ids, weights) == ["on the log<|im_end|>\n"]
    assert out.dropped_turns == 2


def test_mask_left_empty_is_dropped_not_trained_on_everything(chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    long_question = [{"role": "user", "content": "the cat " * 40}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(BadRow) as err:
        encode(tok, {"messages": long_question}, "messages", seq_len=32)
    assert err.value.reason == "no_trained_tokens"


@pytest.mark.parametrize(
    "row, fmt, message, reason",
    [
        ({"text": 5}, "text", "field 'text' holds int 5, expected a string", "wrong_type"),
        ({"body": "x"}, "text", "missing field 'text'", "missing_field"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages",
         "field 'messages[0].role': unknown role 'bot'; expected one of system, user, assistant, tool", "unknown_role"),
        ({"messages": []}, "messages", "field 'messages' is an empty conversation", "empty_messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages",
         "field 'messages' has no assistant turn to train on", "no_assistant_turn"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages",
         "field 'messages[0].content' holds list", "wrong_type"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "sharegpt",
         "field 'conversations[0].from': unknown role 'robot'", "unknown_role"),
    ],
)
def test_bad_rows_name_row_and_field(row, fmt, message, reason):
    with pytest.raises(BadRow) as err:
        to_example(row, fmt, "text", "data.jsonl: row 7")
    assert str(err.value).startswith("data.jsonl: row 7: ") and message in str(err.value)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["text", "id"], "text"),
        (["messages", "tools"], "messages"),
        (["conversations"], "sharegpt"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "instruction"),
        (["input_ids", "labels"], "tokenized"),
    ],
)
def test_format_detection(columns, fmt):
    assert detect_format(columns, "text", "auto", "d") == fmt


FORMAT_EXAMPLES = Path(__file__).parent.parent / "examples" / "data" / "formats"
# What the README's example file of each format trains, row by row (ChatML template).
EXAMPLE_TRAINED_TEXT = {
    "instruction": [["25 °C is 77 °F.</s>"], ["Paris.</s>"]],
    "prompt_completion": [[" 100 centimetres.</s>"], ["144.<|im_end|>\n"]],
    "messages": [["1000 grams.<|im_end|>\n"], ["I will check.<|im_end|>\n", "It is 18 °C and sunny in Paris.<|im_end|>\n"]],
    "sharegpt": [["5280 feet.<|im_end|>\n"], ["tac<|im_end|>\n"]],
}


@pytest.mark.parametrize("path", sorted(FORMAT_EXAMPLES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_each_format_example_file_is_detected_and_trains_what_the_readme_says(path, chat_tokenizers):
    tok = chat_tokenizers["chatml"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    fmt = detect_format(sorted(set().union(*rows)), "text", "auto", str(path))
    assert fmt == path.stem
    for i, row in enumerate(rows):
        (ids, weights), = encode(tok, row, fmt).pieces
        if fmt == "text":
            assert tok.decode(ids) == row["text"] + "</s>" and weights[1:].all() and not weights[0]
        elif fmt == "tokenized":
            labels = np.array(row.get("labels", row["input_ids"]))
            np.testing.assert_array_equal(ids, row["input_ids"])
            np.testing.assert_array_equal(weights[1:] > 0, labels[1:] != -100)
        else:
            assert trained_runs(tok, ids, weights) == EXAMPLE_TRAINED_TEXT[fmt][i]
