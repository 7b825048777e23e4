"""The config reference in the docs, generated from `SFTConfig` itself.

    python -m raysft.orchestrator.reference > docs/config.md
"""

from __future__ import annotations

import enum
import json
import types
import typing

from pydantic_core import PydanticUndefined

from raysft.orchestrator.config import SFTConfig


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
        lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
