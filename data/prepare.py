"""Prepare a dataset into a step-indexed row store: Ray Data encodes, the driver plans rows."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from raysft.data import sources
from raysft.data.chat import require_chat_template
from raysft.data.errors import DataError
from raysft.data.formats import detect_format
from raysft.data.rows import best_fit_decreasing, build_rows, wrapped_rows
from raysft.data.settings import DataSettings
from raysft.data.store import RowStore, write_store
from raysft.data.tokenize import EncodeRows

CHAT_FORMATS = ("messages", "sharegpt")


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(tokenizer_dir.iterdir()):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _function_fingerprint(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    import cloudpickle

    return hashlib.sha256(cloudpickle.dumps(fn)).hexdigest()


def prepare_dataset(
    source: Any,
    tokenizer_dir: Path,
    settings: DataSettings,
    store_root: Path,
    *,
    batch_size: int = 1000,
    num_proc: int | None = None,
    formatting_func: Callable | None = None,
    hub_options: dict | None = None,
    report: Callable[[str], None] | None = print,
) -> RowStore:
    """The row store for `source`, reusing one already prepared with the same fingerprint
    (source content, tokenizer files with their chat template, settings, formatting_func).

    `batch_size` rows per encoding batch, over up to `num_proc` tokenizer actors (2).
    """
    if sources.looks_like_hub_dataset(source):
        source = sources.load_hub_dataset(source, **(hub_options or {}))
    name = sources.describe(source)
    fingerprint = hashlib.sha256(
        json.dumps(
            [sources.fingerprint(source), tokenizer_fingerprint(tokenizer_dir), dataclasses.asdict(settings),
             _function_fingerprint(formatting_func)],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    store_dir = store_root / fingerprint
    if RowStore.exists(store_dir):  # checked before reading: a resumed run parses nothing
        store = RowStore(store_dir)
        if report:
            report(f"{format_stats(store.meta)} (prepared before: {store_dir})")
        return store

    context = ray.data.DataContext.get_current()
    # Same documents in the same order on every run: the packing plan depends on it.
    context.execution_options.preserve_order = True
    # A bad row's own error (file, row, field), not Ray Data's generic wrapper.
    context.raise_original_map_exception = True
    dropped: Counter[str] = Counter()
    read_skips: dict[str, int] = {}
    ds, columns = sources.read_rows(source, settings.on_bad_rows, read_skips)
    dropped.update(read_skips)
    fmt = "text" if formatting_func else detect_format(columns, settings.text_field, settings.dataset_format, name)
    if fmt in CHAT_FORMATS:
        from transformers import AutoTokenizer

        require_chat_template(AutoTokenizer.from_pretrained(tokenizer_dir), name)

    encoded = ds.map_batches(
        EncodeRows,
        fn_constructor_kwargs=dict(
            tokenizer_dir=str(tokenizer_dir), settings=dataclasses.asdict(settings), fmt=fmt,
            source_name=name, formatting_func=formatting_func,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        # A fixed pool: each actor pays the tokenizer load once, up front.
        compute=ray.data.ActorPoolStrategy(size=num_proc or 2),
        num_cpus=0.5,
    )
    docs_ids, docs_weights = [], []
    rows_read = truncated = dropped_turns = 0
    try:
        with _ray_data_task_errors_unlogged():
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                for ids, weights, piece, reason, cut, turns in zip(
                    batch["input_ids"], batch["loss_weights"], batch["piece"], batch["dropped"],
                    batch["truncated_tokens"], batch["dropped_turns"],
                ):
                    rows_read += piece == 0
                    truncated += int(cut)
                    dropped_turns += int(turns)
                    if reason:
                        dropped[str(reason)] += 1
                    else:
                        docs_ids.append(ids)
                        docs_weights.append(weights)
    except Exception as err:  # Ray wraps task errors; surface ours as the one-line cause
        data_error = _find_data_error(err)
        if data_error is None:
            raise
        # Ray appends its retry advice on further lines; ours is the first.
        raise DataError(str(data_error).splitlines()[0]) from None
    rows_read += sum(read_skips.values())
    if not docs_ids:
        detail = f" (dropped: {dict(dropped)})" if dropped else ""
        raise DataError(f"{name}: the dataset has no rows left to train on{detail}")

    rows = _plan_rows(docs_ids, docs_weights, settings)
    lengths = np.array([len(d) for d in docs_ids])
    stats = {
        "fingerprint": fingerprint,
        "source": name,
        "format": fmt,
        "rows_read": int(rows_read),
        "documents": len(docs_ids),
        "dropped": dict(sorted(dropped.items())),
        "tokens": int(lengths.sum()),
        "max_token_id": int(max(int(d.max()) for d in docs_ids if len(d))),
        "supervised_tokens": int(sum(float(w.sum()) for w in docs_weights)),
        "truncated_tokens": int(truncated),
        "dropped_turns": int(dropped_turns),
        "rows": int(rows["input_ids"].shape[0]),
        "seq_len": settings.seq_len,
        "padding_fraction": float(1 - lengths.sum() / rows["input_ids"].size),
        "packing": settings.packing_strategy if settings.packing else "none",
    }
    store = RowStore(write_store(store_dir, rows, stats))
    (store_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    if report:
        report(format_stats(stats))
    return store


@contextlib.contextmanager
def _ray_data_task_errors_unlogged():
    """Ray Data logs a failed task's whole remote trace before raising its error; the
    error still reaches the caller (a bad row as one line naming file, row and field)."""
    loggers = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    for logger in loggers:
        logger.addFilter(_below_error)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_below_error)


_RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _plan_rows(docs_ids, docs_weights, settings: DataSettings) -> dict[str, np.ndarray]:
    if settings.packing and settings.packing_strategy == "wrapped":
        return wrapped_rows(docs_ids, docs_weights, settings.seq_len)
    if settings.packing:
        bins = best_fit_decreasing(np.array([len(d) for d in docs_ids]), settings.seq_len)
    else:
        bins = [[i] for i in range(len(docs_ids))]
    return build_rows(docs_ids, docs_weights, bins, settings.seq_len)


def format_stats(stats: dict) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    return (
        f"data {stats['source']} ({stats['format']}): {stats['rows_read']} rows read, {stats['documents']} documents "
        f"kept, dropped: {dropped}; {stats['tokens']} tokens, {stats['supervised_tokens']} trained, "
        f"{stats['truncated_tokens']} truncated; {stats['rows']} rows of {stats['seq_len']} "
        f"({stats['packing']} packing), padding {stats['padding_fraction']:.2%}"
    )


def _find_data_error(err: BaseException) -> DataError | None:
    """The worker's own DataError inside Ray's wrappers, whose text is a banner."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a Ray task error holds the worker's exception here
        if isinstance(cause, DataError):
            return cause
        if isinstance(err, DataError) and not isinstance(err, ray.exceptions.RayError):
            return err
        err = cause or err.__cause__ or err.__context__
    return None
