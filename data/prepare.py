"""Prepare a dataset into a step-indexed row store: Ray Data tokenizes, the driver plans rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from raysft.data import sources
from raysft.data.errors import DataError
from raysft.data.rows import best_fit_decreasing, build_rows, truncate
from raysft.data.store import RowStore, write_store
from raysft.data.tokenize import TokenizeText


@dataclasses.dataclass(frozen=True)
class TextDataSettings:
    """The settings that change which tokens end up in the rows."""

    text_field: str
    seq_len: int
    packing: bool
    add_special_tokens: bool


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(tokenizer_dir.iterdir()):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def prepare_text_dataset(
    source: Any,
    tokenizer_dir: Path,
    settings: TextDataSettings,
    store_root: Path,
    *,
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> RowStore:
    """The row store for `source`, reusing one already prepared with the same fingerprint.

    `batch_size` rows per tokenization batch, over up to `num_proc` tokenizer actors (2).
    """
    fingerprint = hashlib.sha256(
        json.dumps(
            [sources.fingerprint(source), tokenizer_fingerprint(tokenizer_dir), dataclasses.asdict(settings)],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    store_dir = store_root / fingerprint
    if RowStore.exists(store_dir):  # checked before reading: a resumed run parses nothing
        return RowStore(store_dir)

    tokenized = sources.read_rows(source, settings.text_field).map_batches(
        TokenizeText,
        fn_constructor_kwargs=dict(
            tokenizer_dir=str(tokenizer_dir),
            text_field=settings.text_field,
            add_special_tokens=settings.add_special_tokens,
        ),
        batch_size=batch_size,
        concurrency=(1, num_proc or 2),
        num_cpus=0.5,
    )
    docs_ids, docs_weights = [], []
    try:
        for batch in tokenized.iter_batches(batch_size=None, batch_format="numpy"):
            docs_ids.extend(batch["input_ids"])
            docs_weights.extend(batch["loss_weights"])
    except Exception as err:  # Ray wraps task errors; surface ours as the one-line cause
        data_error = _find_data_error(err)
        if data_error is None:
            raise
        raise DataError(f"{sources.describe(source)}: {data_error}") from None
    if not docs_ids:
        raise DataError(f"{sources.describe(source)}: the dataset has no rows")

    docs_ids, docs_weights, truncated = truncate(docs_ids, docs_weights, settings.seq_len)
    lengths = np.array([len(d) for d in docs_ids])
    if settings.packing:
        bins = best_fit_decreasing(lengths, settings.seq_len)
    else:
        bins = [[i] for i in range(len(docs_ids))]
    rows = build_rows(docs_ids, docs_weights, bins, settings.seq_len)
    stats = {
        "fingerprint": fingerprint,
        "source": sources.describe(source),
        "documents": len(docs_ids),
        "tokens": int(lengths.sum()),
        "supervised_tokens": int(sum(w.sum() for w in docs_weights)),
        "truncated_tokens": int(truncated),
        "padding_fraction": float(1 - lengths.sum() / rows["input_ids"].size),
    }
    return RowStore(write_store(store_dir, rows, stats))


def _find_data_error(err: BaseException) -> DataError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DataError):
            return err
        err = err.__cause__ or err.__context__
    return None
