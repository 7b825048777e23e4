"""Prepare a dataset into a step-indexed row store: Ray tasks read, encode and write rows;
the driver holds only each document's length and place, and plans the rows."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
from etils import epath

from raysft.data import mixture, sources
from raysft.data.chat import require_chat_template
from raysft.data.collect import collect_documents
from raysft.data.formats import detect_format
from raysft.data.row_shards import Documents, rows_per_shard, write_row_shards
from raysft.data.rows import Bins, Placements, best_fit_decreasing, bin_placements, wrapped_placements
from raysft.data.settings import DataSettings
from raysft.data.stall import DEFAULT_TIMEOUT_S
from raysft.data.store import META_FILE, RowStore
from raysft.data.tokenize import encode_rows
from raysft.storage.credentials import Credentials
from raysft.storage.errors import DataError
from raysft.storage.locations import is_object_storage, local_copy, location, make_dir, remove_tree

CHAT_FORMATS = ("messages", "sharegpt")
# Ray Data's advice when a source has fewer blocks than encoding tasks may run: a small
# dataset, not something a user should act on.
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'MapBatches", category=UserWarning)


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Of a local directory (`locations.local_copy` of one on object storage)."""
    digest = hashlib.sha256()
    for file in sorted(tokenizer_dir.iterdir()):
        if file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as f:  # streamed: a model directory holds the weights too
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _function_fingerprint(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    from ray import cloudpickle  # Ray's own copy: cloudpickle itself may not be installed

    return hashlib.sha256(cloudpickle.dumps(fn)).hexdigest()


def prepare_dataset(
    source: Any,
    tokenizer_dir: str | os.PathLike,
    settings: DataSettings,
    store_root: str | os.PathLike,
    *,
    batch_size: int = 1000,
    num_proc: int | None = None,
    formatting_func: Callable | None = None,
    hub_options: dict | None = None,
    report: Callable[[str], None] | None = print,
    shard_rows: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    label_selector: dict[str, str] | None = None,
    mixture_seed: int = 0,
    mixture_stopping: str = "first_exhausted",
) -> RowStore:
    """The row store for `source` (one dataset, or a mixture: see `mixture`), reusing one
    already prepared with the same fingerprint (source content, tokenizer files with their
    chat template, settings, formatting_func, and a mixture's names, weights, seed and
    stopping rule).

    Reading, encoding (`batch_size` rows per batch, in tasks that spread over the
    cluster's CPUs, at most `num_proc` at once) and row writing (`shard_rows` rows per
    task; by default ~128 MiB shards) all run in Ray tasks; the driver gets each
    document's length and place, mixes and plans the rows and collects the stats. No
    progress for `timeout_s` (no encoded batch, no row shard written) ends it with
    `Stalled`. Every task runs on the nodes `label_selector` matches
    (`data_nodes.off_tpu_hosts`).

    `store_root` and `tokenizer_dir` are local directories every node sees or
    object-storage prefixes. Locally a store is written under a temporary name and
    renamed; on object storage its rows are written in place and `meta.json`, written
    last, is what makes it a store (an interrupted one is written again, identically).
    """
    store_root = location(store_root)
    local_tokenizer = local_copy(tokenizer_dir)
    # The tasks read the tokenizer and write the store with the driver's credentials.
    credentials = Credentials.for_paths([store_root.as_posix(), location(tokenizer_dir).as_posix()])
    _data_context(label_selector)  # before any dataset is made: a dataset keeps the context it was made in
    parts = mixture.parts(source)
    if settings.pairs and mixture.is_mixture(source):
        raise ValueError("preference data is one dataset: a mixture of preference sources is not supported")
    srcs = [sources.resolve(part.source, hub_options) for part in parts]  # datasets are made later, by `read()`
    weights = [part.weight for part in parts] if parts[0].weight is not None else None
    tokenizer_key = tokenizer_fingerprint(local_tokenizer)
    identity = [tokenizer_key, dataclasses.asdict(settings), _function_fingerprint(formatting_func), STORE_FORMAT]
    if mixture.is_mixture(source):
        identity.append([[part.name for part in parts], weights, mixture_seed if weights else None,
                         mixture_stopping if weights else None])
    known = [src.fingerprint for src in srcs]
    fingerprint = _fingerprint(_sources_fingerprint(known), identity) if all(known) else None
    if fingerprint and RowStore.exists(store_root / fingerprint):  # a resumed run reads no row
        return _reuse(store_root / fingerprint, report)

    formats = _formats(srcs, settings, formatting_func, local_tokenizer)
    in_place = is_object_storage(store_root)
    work = store_root / f".preparing-{uuid.uuid4().hex[:12]}"
    docs_dir = work / "docs"
    make_dir(docs_dir)
    try:
        encoded = [
            _encode(src, fmt, docs_dir, tokenizer_dir, tokenizer_key, settings, formatting_func, batch_size, num_proc,
                    credentials, timeout_s, report)
            for src, fmt in zip(srcs, formats)
        ]
        if fingerprint is None:
            hashes = [src.fingerprint or stats["content_hash"] for src, (_, stats) in zip(srcs, encoded)]
            fingerprint = _fingerprint(_sources_fingerprint(hashes), identity)
            if RowStore.exists(store_root / fingerprint):
                return _reuse(store_root / fingerprint, report)
        taken = mixture.select([docs.trained for docs, _ in encoded], weights, mixture_seed, mixture_stopping)
        docs = Documents.join([(docs, index) for (docs, _), index in zip(encoded, taken)])
        stats = _mixture_stats(parts, srcs, formats, encoded, taken) if mixture.is_mixture(source) else encoded[0][1]
        stats.pop("content_hash", None)
        stats["fingerprint"] = fingerprint
        store_dir = store_root / fingerprint
        rows_dir = store_dir if in_place else work
        _write_rows(docs, docs_dir, rows_dir, stats, settings, shard_rows, timeout_s, credentials, report)
        if not in_place and not RowStore.exists(store_dir):  # else another process finished the same store first
            shutil.rmtree(store_dir, ignore_errors=True)
            work.rename(store_dir)
    finally:
        remove_tree(work)
    if report:
        report(format_stats(stats))
    return RowStore(store_dir)


def _data_context(label_selector: dict[str, str] | None) -> None:
    context = ray.data.DataContext.get_current()
    # A bad row's own error (file, row, field), not Ray Data's generic wrapper.
    context.raise_original_map_exception = True
    context.execution_options.label_selector = label_selector  # our own tasks read it here too


def _write_rows(docs: Documents, docs_dir: epath.Path, rows_dir: epath.Path, stats: dict, settings: DataSettings,
                shard_rows: int | None, timeout_s: float, credentials: Credentials, report) -> None:
    """The documents planned into rows and written as shards into `rows_dir` (`stats`
    completed with the rows' figures), then `stats.json` and, last, the store's meta."""
    placements = _plan(docs.length, settings)
    with _bar(placements.num_rows, "writing rows", report) as bar:
        shard_sizes = write_row_shards(
            placements, docs, docs_dir, rows_dir, settings.seq_len, shard_rows or rows_per_shard(settings.seq_len),
            progress=bar.update if bar is not None else None, timeout_s=timeout_s, name=stats["source"],
            credentials=credentials,
        )
    stats.update(
        rows=placements.num_rows, seq_len=settings.seq_len,
        padding_fraction=float(1 - stats["tokens"] / max(placements.num_rows * settings.seq_len, 1)),
        packing=settings.packing_strategy if settings.packing else "none",
    )
    remove_tree(docs_dir)
    (rows_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (rows_dir / META_FILE).write_text(json.dumps(dict(stats, num_rows=placements.num_rows, shard_rows=shard_sizes),
                                                 indent=2))


def _formats(srcs: list[sources.Source], settings: DataSettings, formatting_func, local_tokenizer: Path) -> list[str]:
    """Each source's format; a conversation source needs a chat template (the tokenizer
    is loaded once, and only then)."""
    formats = [
        "text" if formatting_func else detect_format(src.columns, settings.text_field, settings.dataset_format, src.name)
        for src in srcs
    ]
    for src, fmt in zip(srcs, formats):  # a preference run forces its format, so only SFT can meet pairs
        if fmt == "preference" and not settings.pairs:
            raise DataError(f"{src.name}: preference rows (chosen, rejected) train with DPOTrainer (raysft dpo); "
                            "SFT takes text, instruction, prompt/completion, messages or token rows")
    chats = [src for src, fmt in zip(srcs, formats) if fmt in CHAT_FORMATS]
    if chats:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local_tokenizer)
        for src in chats:
            require_chat_template(tokenizer, src.name)
    return formats


def _encode(src: sources.Source, fmt: str, docs_dir: epath.Path, tokenizer_dir, tokenizer_key: str,
            settings: DataSettings, formatting_func, batch_size: int, num_proc: int | None, credentials: Credentials,
            timeout_s: float,
            report) -> tuple[Documents, dict]:
    """One source's documents, encoded by Ray Data tasks into `docs_dir`, and its stats."""
    # Same documents in the same order on every run (the packing plan depends on it):
    # sources with row numbers are put in order by the driver, the others by Ray Data,
    # which then holds finished batches back behind slower ones.
    ray.data.DataContext.get_current().execution_options.preserve_order = not src.numbered
    encoded = src.read().map_batches(
        credentials.around(encode_rows),
        fn_kwargs=dict(
            tokenizer_dir=str(tokenizer_dir), tokenizer_key=tokenizer_key, settings=dataclasses.asdict(settings),
            fmt=fmt, parts=src.parts, docs_dir=str(docs_dir), formatting_func=formatting_func,
            hash_rows=src.fingerprint is None,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=_encoders(num_proc)),
        num_cpus=1,
        runtime_env=credentials.runtime_env(),
    )
    with _bar(None, f"encoding {src.name}", report) as bar:
        docs, stats = collect_documents(encoded, src.name, timeout_s, bar)
    stats["format"] = fmt
    return docs, stats


def _sources_fingerprint(fingerprints: list[str]) -> str:
    return fingerprints[0] if len(fingerprints) == 1 else hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()


def _mixture_stats(parts, srcs, formats, encoded, taken) -> dict:
    """The mixture's totals over what it took, and each source's own counts."""
    per_source = {}
    weight_sum = sum(part.weight or 0.0 for part in parts)
    for part, src, fmt, (docs, stats), index in zip(parts, srcs, formats, encoded, taken):
        per_source[part.name] = {
            "source": src.name, "format": fmt, "weight": part.weight and part.weight / weight_sum,
            **{k: stats[k] for k in ("rows_read", "documents", "dropped", "tokens", "supervised_tokens")},
            "taken_documents": int(len(index)),
            "taken_tokens": int(docs.length[index].sum()),
            "taken_supervised_tokens": int(docs.trained[index].sum()),
            "passes": float(len(index) / max(len(docs.length), 1)),
        }
    taken_trained = sum(s["taken_supervised_tokens"] for s in per_source.values())
    for entry in per_source.values():
        entry["trained_share"] = entry["taken_supervised_tokens"] / max(taken_trained, 1)
    dropped: Counter[str] = Counter()
    for _, stats in encoded:
        dropped.update(stats["dropped"])
    return {
        "source": "mixture of " + ", ".join(per_source),
        "format": "/".join(sorted(set(formats))),
        "rows_read": sum(stats["rows_read"] for _, stats in encoded),
        "documents": sum(s["taken_documents"] for s in per_source.values()),
        "dropped": dict(sorted(dropped.items())),
        "tokens": sum(s["taken_tokens"] for s in per_source.values()),
        "max_token_id": max(stats["max_token_id"] for _, stats in encoded),
        "supervised_tokens": taken_trained,
        "truncated_tokens": sum(stats["truncated_tokens"] for _, stats in encoded),
        "dropped_turns": sum(stats["dropped_turns"] for _, stats in encoded),
        "sources": per_source,
    }


STORE_FORMAT = "row shards v2"


def _encoders(num_proc: int | None) -> int | None:
    """The most encoding tasks at once: `num_proc`, else as many as the cluster has CPUs
    (Ray Data's own limit, growing with the cluster). A Ray whose nodes all run on this
    machine may announce more CPUs than it has cores (the embedded Ray does, so its workers
    never wait for a slot): there they stop at the cores."""
    here = ray.util.get_node_ip_address()
    if num_proc is None and all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"]):
        return os.cpu_count() or 1
    return num_proc


def _fingerprint(source_fingerprint: str, identity: list) -> str:
    return hashlib.sha256(json.dumps([source_fingerprint, *identity], sort_keys=True).encode()).hexdigest()[:20]


def _reuse(store_dir: epath.Path, report) -> RowStore:
    store = RowStore(store_dir)
    if report:
        report(f"{format_stats(store.meta)} (prepared before: {store_dir})")
    return store


@contextlib.contextmanager
def _bar(total: int | None, what: str, report):
    if report is None:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="rows", leave=False, disable=None) as bar:  # on a terminal only
        yield bar


def _plan(lengths: np.ndarray, settings: DataSettings) -> Placements:
    if settings.pairs:
        return _pair_plan(lengths, settings)
    if settings.packing and settings.packing_strategy == "wrapped":
        return wrapped_placements(lengths, settings.seq_len)
    if settings.packing:
        return bin_placements(best_fit_decreasing(lengths, settings.seq_len), lengths)
    return bin_placements(Bins.one_per_document(len(lengths)), lengths)


def _pair_plan(lengths: np.ndarray, settings: DataSettings) -> Placements:
    """Preference pairs (chosen, rejected: documents 2j and 2j+1) whole in a row, chosen
    first: packed best-fit by the pair's length, or one pair per row."""
    if settings.packing and settings.packing_strategy == "wrapped":
        raise ValueError("preference pairs pack whole (packing_strategy 'bfd'): 'wrapped' would cut a pair")
    pair_lengths = lengths[0::2] + lengths[1::2]
    pairs = best_fit_decreasing(pair_lengths, settings.seq_len) if settings.packing else Bins.one_per_document(
        len(pair_lengths))
    docs = np.stack([2 * pairs.doc, 2 * pairs.doc + 1], axis=1).reshape(-1)
    return bin_placements(Bins(docs, 2 * pairs.counts), lengths)


def format_stats(stats: dict) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    return (
        f"data {stats['source']} ({stats['format']}): {stats['rows_read']} rows read, {stats['documents']} documents "
        f"{'in the mixture' if 'sources' in stats else 'kept'}, dropped: {dropped}; {stats['tokens']} tokens, {stats['supervised_tokens']} trained, "
        f"{stats['truncated_tokens']} truncated; {stats['rows']} rows of {stats['seq_len']} "
        f"({stats['packing']} packing), padding {stats['padding_fraction']:.2%}"
    ) + "".join(
        f"\n  {name} ({entry['format']}, {entry['source']}): {entry['taken_documents']} of {entry['documents']} "
        f"documents, {entry['taken_supervised_tokens']} trained tokens ({entry['trained_share']:.1%}"
        + (f" for weight {entry['weight']:.1%}" if entry["weight"] is not None else "") + f"; {entry['passes']:.2f} passes)"
        for name, entry in stats.get("sources", {}).items()
    )
