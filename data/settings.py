"""The data settings that decide which tokens end up in the rows (and so the fingerprint)."""

from __future__ import annotations

import dataclasses

FORMATS = ("auto", "text", "instruction", "prompt_completion", "messages", "sharegpt", "tokenized", "preference")
TRUNCATION = ("truncate", "drop", "split", "drop_turns")
PACKING_STRATEGIES = ("bfd", "wrapped")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    seq_len: int
    text_field: str = "text"
    dataset_format: str = "auto"
    packing: bool = False
    packing_strategy: str = "bfd"
    add_special_tokens: bool = False
    # None: on for prompt/completion rows (TRL's default), where it is the point of the format.
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = True
    train_on_inputs: bool = False
    truncation: str = "truncate"
    on_bad_rows: str = "error"
    # Arguments the chat template reads (`enable_thinking`, `date_string`, ...).
    chat_template_kwargs: dict | None = None
    # Preference pairs (`data.pairs`): a row holds whole pairs, each sequence at most
    # `max_length` tokens (TRL's; default seq_len // 2), prompt and completions cut to the
    # other two first.
    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None

    @property
    def pairs(self) -> bool:
        return self.dataset_format == "preference"

    def __post_init__(self):
        for name, allowed in (
            ("dataset_format", FORMATS), ("truncation", TRUNCATION), ("packing_strategy", PACKING_STRATEGIES),
            ("on_bad_rows", ("error", "skip")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
