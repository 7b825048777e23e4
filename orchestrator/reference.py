"""The config reference in the docs, generated from `SFTConfig` and `DPOConfig` themselves.

    python -m raysft.orchestrator.reference > docs/config.md
"""

from __future__ import annotations

import enum
import json
import types
import typing

from pydantic_core import PydanticUndefined

from raysft.orchestrator.config import SFTConfig
from raysft.orchestrator.dpo_config import DPOConfig


def _type(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_args(annotation):  # tuple[int, int, int, int], dict[str, float]
        return str(annotation)
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value)}`"


def markdown() -> str:
    lines = [
        "# SFTConfig reference",
        "",
        "Generated from `SFTConfig` by `python -m raysft.orchestrator.reference`; every field is also a",
        "`raysft sft --<field>` flag and a key of a `--config` YAML file.",
        "",
        "| field | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in SFTConfig.model_fields.items():
        lines.append(_row(name, field))
    lines += [
        "",
        "# DPOConfig reference",
        "",
        "`DPOConfig` (`raysft dpo`) has every field above with the same meaning, and these (new, or with",
        "another default). `max_sequence_length`, the row length, defaults to 2 x `max_length`.",
        "",
        "| field | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in DPOConfig.model_fields.items():
        sft = SFTConfig.model_fields.get(name)
        if sft is None or _row(name, sft) != _row(name, field):
            lines.append(_row(name, field))
    return "\n".join(lines) + "\n"


def _row(name: str, field) -> str:
    return f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |"


if __name__ == "__main__":
    print(markdown(), end="")
