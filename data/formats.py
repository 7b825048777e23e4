"""Dataset formats: which one a dataset is, and each row as one canonical `Example`.

Only structure is checked here (fields present, types, roles); tokens come later.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from raysft.storage.errors import BadRow, DataError

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers as the common exports spell them.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "tool": "tool", "function_call": "assistant",
    "observation": "tool", "function_response": "tool",
}


@dataclasses.dataclass
class Example:
    """One row in canonical form; exactly one of the groups below is set."""

    text: str | None = None  # plain text, every token trained
    text_ids: list[int] | None = None  # its tokens, when tokenized in a batch
    prompt: str | list[dict] | None = None  # prompt/completion: strings or message lists
    completion: str | list[dict] | None = None
    messages: list[dict] | None = None  # a conversation for the chat template
    tools: list[dict] | None = None
    input_ids: list[int] | None = None  # pre-tokenized, labels -100 where not trained
    labels: list[int] | None = None
    chosen: str | list[dict] | None = None  # a preference pair's completions (`data.pairs`), after `prompt`
    rejected: str | list[dict] | None = None


def detect_format(columns: list[str], text_field: str, forced: str, where: str) -> str:
    """The format named in config, or the one the columns show."""
    required = {
        "text": [text_field], "instruction": ["instruction"], "prompt_completion": ["prompt", "completion"],
        "messages": [text_field if text_field != "text" else "messages"], "sharegpt": ["conversations"],
        "tokenized": ["input_ids"], "preference": ["chosen", "rejected"],
    }
    if forced != "auto":
        missing = [c for c in required[forced] if c not in columns]
        if missing:
            raise DataError(
                f"{where}: dataset_format {forced!r} needs column(s) {', '.join(missing)}; "
                f"available columns: {', '.join(columns)}"
            )
        return forced
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "instruction" in columns and ("response" in columns or "output" in columns):
        return "instruction"
    if text_field in columns:  # before pairs: SFT on one column of preference rows is the seed's example
        return "text"
    if "chosen" in columns and "rejected" in columns:
        return "preference"
    raise DataError(
        f"{where}: dataset_text_field {text_field!r} is not a column and no other format's columns are "
        f"present (messages, conversations, prompt+completion, instruction+response, input_ids); "
        f"available columns: {', '.join(columns)}"
    )


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row or row[name] is None:
        raise BadRow(f"{where}: missing field {name!r}", "missing_field")
    return row[name]


def _string(row: dict, name: str, where: str, optional: bool = False) -> str | None:
    if optional and row.get(name) is None:
        return None
    value = _field(row, name, where)
    if not isinstance(value, str):
        raise BadRow(
            f"{where}: field {name!r} holds {type(value).__name__} {repr(value)[:60]}, expected a string",
            "wrong_type",
        )
    return value


def _messages(value: Any, field: str, where: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[dict]:
    if not isinstance(value, list):
        raise BadRow(f"{where}: field {field!r} holds {type(value).__name__}, expected a list of messages", "wrong_type")
    if not value:
        raise BadRow(f"{where}: field {field!r} is an empty conversation", "empty_messages")
    out = []
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f"{where}: field {at!r} holds {type(message).__name__}, expected an object", "wrong_type")
        role = message.get(role_key)
        mapped = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            expected = ", ".join(roles or ROLES)
            raise BadRow(f"{where}: field '{at}.{role_key}': unknown role {role!r}; expected one of {expected}", "unknown_role")
        content = message.get(content_key)
        if not isinstance(content, str) and not (mapped == "assistant" and message.get("tool_calls")):
            raise BadRow(
                f"{where}: field '{at}.{content_key}' holds {type(content).__name__} {repr(content)[:40]}, expected a string",
                "wrong_type",
            )
        extra = {k: v for k, v in message.items() if k not in (role_key, content_key) and v is not None}
        out.append({**extra, "role": mapped, "content": content if isinstance(content, str) else ""})
    return out


def _require_assistant(messages: list[dict], field: str, where: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"{where}: field {field!r} has no assistant turn to train on", "no_assistant_turn")
    return messages


def to_example(row: dict, fmt: str, text_field: str, where: str, formatting_func: Callable | None = None) -> Example:
    if formatting_func is not None:
        text = formatting_func(row)
        if not isinstance(text, str):
            raise BadRow(f"{where}: formatting_func returned {type(text).__name__}, expected a string", "wrong_type")
        return Example(text=text)
    if fmt == "text":
        return Example(text=_string(row, text_field, where))
    if fmt == "instruction":
        instruction = _string(row, "instruction", where)
        extra = _string(row, "input", where, optional=True)
        response = _string(row, "response" if row.get("response") is not None else "output", where)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        # A blank line between the prompt and the response, so neither runs into the other.
        return Example(prompt=prompt + "\n\n", completion=response)
    if fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", where), _field(row, "completion", where)
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(prompt=prompt, completion=completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            completion_messages = _require_assistant(_messages(completion, "completion", where), "completion", where)
            return Example(prompt=_messages(prompt, "prompt", where), completion=completion_messages,
                           tools=row.get("tools"))
        raise BadRow(
            f"{where}: fields 'prompt' and 'completion' must both be strings or both message lists, "
            f"got {type(prompt).__name__} and {type(completion).__name__}",
            "wrong_type",
        )
    if fmt == "messages":
        field = text_field if text_field != "text" else "messages"
        messages = _require_assistant(_messages(_field(row, field, where), field, where), field, where)
        return Example(messages=messages, tools=row.get("tools"))
    if fmt == "sharegpt":
        messages = _messages(_field(row, "conversations", where), "conversations", where, "from", "value", SHAREGPT_ROLES)
        return Example(messages=_require_assistant(messages, "conversations", where), tools=row.get("tools"))
    if fmt == "tokenized":
        ids = _field(row, "input_ids", where)
        labels = row.get("labels")
        for name, values in (("input_ids", ids), ("labels", labels)):
            if values is not None and (not isinstance(values, list) or not all(isinstance(v, int) for v in values)):
                raise BadRow(f"{where}: field {name!r} must be a list of integers", "wrong_type")
        if labels is not None and len(labels) != len(ids):
            raise BadRow(f"{where}: field 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}", "wrong_type")
        if not ids:
            raise BadRow(f"{where}: field 'input_ids' is empty", "missing_field")
        return Example(input_ids=ids, labels=labels)
    raise ValueError(f"unknown dataset format {fmt!r}")
