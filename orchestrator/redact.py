"""Settings as they are recorded (run.json, wandb's config): secrets replaced.

Users put hub tokens and storage keys into `dataset_kwargs` (`token=`, `storage_options`),
as `datasets.load_dataset` takes them; a run directory and a wandb project are shared
more widely than the driver's memory.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
# Whole words of a setting's name: `hf_token`, `api_key` and `aws_secret_access_key` hold
# secrets; `max_new_tokens`, `tokenizer`, `pad_token` and `chars_per_token` do not.
_VOCABULARY = "".join(rf"(?<!{w}_)" for w in ("pad", "eos", "bos", "unk", "sep", "cls", "mask", "per"))
_SECRET_NAME = re.compile(rf"(?:^|[^a-z]){_VOCABULARY}(?:token|key|secret|password|passwd|credentials?)(?:[^a-z]|$)")
_SECRET_GROUPS = {"storage_options"}  # every value inside


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name).lower()))


def redact(value: Any, secret: bool = False) -> Any:
    """`value` with every value under a secret-sounding key replaced (booleans and None
    kept: `token=True` uses the saved login and says nothing)."""
    if isinstance(value, dict):
        return {k: redact(v, secret or is_secret_name(k) or k in _SECRET_GROUPS) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secret) for v in value)
    if secret and value is not None and not isinstance(value, bool):
        return REDACTED
    return value
