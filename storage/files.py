"""Dataset files wherever they live: a local path, a directory or glob of files, or an
object-storage / hub URI (`s3://`, `gs://`, `hf://`), opened the same way by every task.

pyarrow's filesystems read S3 (credentials and `AWS_ENDPOINT_URL` from the standard
environment) and GCS natively; `hf://` goes through huggingface_hub's fsspec filesystem.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from raysft.storage.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hf")


def unsupported_scheme(url: str, supported: tuple[str, ...], local: str = "a local path") -> str:
    """The one line for a URI whose scheme raysft does not read there."""
    scheme = url.split("://", 1)[0]
    return f"{url}: unsupported URI scheme {scheme!r}; use {local} or one of " + ", ".join(f"{s}://" for s in supported)


def is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def filesystem(url: str):
    """(pyarrow FileSystem, path inside it) for a local path or a remote URI."""
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), str(Path(url).resolve())
    scheme, rest = url.split("://", 1)
    if scheme not in REMOTE_SCHEMES:
        raise DataError(unsupported_scheme(url, REMOTE_SCHEMES))
    if scheme == "hf":
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), rest
    try:
        fs, path = pafs.FileSystem.from_uri(url)
    except Exception as err:  # noqa: BLE001 - bad bucket names, missing credentials alike
        raise DataError(f"{url}: cannot open: {first_line(err)}") from None
    return fs, path


def portable_filesystem(url: str):
    """(pyarrow FileSystem, path) for a URI, to be pickled to a process on another node:
    an S3 filesystem carries the driver's endpoint and credentials from the standard
    environment (a filesystem from `filesystem` resolves them again where it lands)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    env = os.environ
    if url.startswith("s3://") and env.get("AWS_ACCESS_KEY_ID"):
        fs = pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"), region=fs.region,
            endpoint_override=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        )
    return fs, path


def first_line(err: BaseException) -> str:
    """An error's first line: what a one-line message quotes of a library's error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def list_files(source: str | Path) -> list[str]:
    """The dataset files `source` names: one file, a directory's files (recursively) or a
    glob, sorted, so every run reads them in one order."""
    text = str(source)
    if is_remote(text):
        import pyarrow.fs as pafs

        fs, path = filesystem(text)
        try:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                scheme = text.split("://", 1)[0]
                found = sorted(f"{scheme}://{i.path}" for i in infos if i.is_file and i.path.endswith(SUFFIXES))
            elif info.type == pafs.FileType.File:
                found = [text]
            else:
                raise DataError(f"dataset not found: {text}")
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - network, credentials, missing bucket
            raise DataError(f"{text}: cannot read: {first_line(err)}") from None
    else:
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif path.is_file():
            found = [str(path)]
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise DataError(f"dataset file not found: {path}")
    if not found:
        raise DataError(f"{text}: no dataset files ({', '.join(SUFFIXES)}) there")
    suffixes = {Path(f).suffix for f in found}
    unsupported = suffixes - set(SUFFIXES)
    if unsupported:
        raise DataError(f"{text}: unsupported file type {sorted(unsupported)[0]!r}; use .jsonl, .json, .parquet or .csv")
    if len(suffixes) > 1:
        raise DataError(f"{text}: mixes file types {', '.join(sorted(suffixes))}; give one type per dataset")
    return found


def count_newlines(url: str, chunk_bytes: int, digest=None) -> list[int]:
    """The newlines in each `chunk_bytes` range of a file, read once; `digest` (a hashlib
    object) is fed the same bytes on the way."""
    fs, path = filesystem(url)
    counts = []
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            if digest is not None:
                digest.update(chunk)
            counts.append(chunk.count(b"\n"))
    return counts


def scan_local(path: str, chunk_bytes: int) -> tuple[str, list[int]]:
    """A local file's sha256 and the newlines in each `chunk_bytes` range, in one read."""
    digest = hashlib.sha256()
    counts = count_newlines(path, chunk_bytes, digest)
    return digest.hexdigest(), counts


def remote_fingerprint(url: str) -> str:
    """A remote object by what its store says of its content (size, modification time
    and, on the hub, the revision in the URI or the blob id), so a changed object is never
    mistaken for the prepared one, without downloading it."""
    fs, path = filesystem(url)
    try:
        info = fs.get_file_info(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{url}: cannot read: {first_line(err)}") from None
    identity = [url, info.size, info.mtime_ns]
    if url.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        details = HfFileSystem().info(path)
        identity.append(details.get("blob_id") or (details.get("lfs") or {}).get("sha256"))
    return hashlib.sha256(repr(identity).encode()).hexdigest()


def file_size(url: str) -> int:
    fs, path = filesystem(url)
    return fs.get_file_info(path).size
