"""Directories that are local paths or object-storage prefixes (`s3://`, `gs://`): run
directories, prepared data, tokenizers, exports.

Both are `etils.epath` paths (the ones orbax uses), so code writes `run_dir / "x"` either
way. What a host memory-maps or hands to a library that wants a local directory (row
shards, a tokenizer) it reads from `local_copy`: the directory itself when local, else a
copy in this host's cache named by the objects' listing, so a changed directory is a new
copy and an unchanged one is fetched once per host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
from etils import epath

from raysft.storage.errors import DataError
from raysft.storage.files import filesystem, first_line, unsupported_scheme

OBJECT_SCHEMES = ("s3", "gs")

# s3fs and gcsfs keep every listing for the life of the process by default, so a driver
# that once listed a run directory would never see the checkpoints the hosts add to it.
for _protocol in ("s3", "gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False


def default_cache_dir() -> Path:
    """This host's cache of fetched models, converted checkpoints and copies."""
    return Path(os.environ.get("RAYSFT_CACHE", Path.home() / ".cache" / "raysft"))


def is_object_storage(path: str | os.PathLike) -> bool:
    text = os.fspath(path) if not isinstance(path, epath.Path) else path.as_posix()
    return "://" in text and text.split("://", 1)[0] in OBJECT_SCHEMES


def location(text: str | os.PathLike) -> epath.Path:
    """A local path (made absolute) or an object-storage URI; any other scheme is refused
    by name, never taken for a local folder called "scheme:"."""
    text = text.as_posix() if isinstance(text, epath.Path) else os.fspath(text)
    if "://" in text:
        if text.split("://", 1)[0] not in OBJECT_SCHEMES:
            raise ValueError(unsupported_scheme(text, OBJECT_SCHEMES, "a local directory"))
        return epath.Path(text.rstrip("/"))
    return epath.Path(Path(text).expanduser().absolute())


def make_dir(path: epath.Path) -> None:
    """A local directory with its parents; nothing on object storage, where prefixes need
    no creating (and creating one could create a bucket by mistake)."""
    if not is_object_storage(path):
        path.mkdir(parents=True, exist_ok=True)


def listing(url: str) -> dict[str, tuple[int, int]]:
    """Files under an object-storage prefix, recursively: relative name -> (size, mtime ns)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(url)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): (i.size, i.mtime_ns or 0) for i in infos if i.is_file}


def listing_digest(files: dict[str, tuple[int, int]]) -> str:
    return hashlib.blake2b(json.dumps(sorted(files.items())).encode(), digest_size=8).hexdigest()


def local_copy(path: str | os.PathLike, files: dict[str, tuple[int, int]] | None = None) -> Path:
    """`path` as a local directory: itself when local, else this host's copy of the
    objects under it (`files`: those of a listing already taken, default all). A lock
    keeps two processes of one host from copying at once; each file lands under its
    name only once complete."""
    from filelock import FileLock

    path = location(path)
    if not is_object_storage(path):
        return Path(path)
    url = path.as_posix()
    try:
        files = listing(url) if files is None else files
    except Exception as err:  # noqa: BLE001 - credentials, missing bucket, network alike
        raise DataError(f"{url}: cannot list: {first_line(err)}") from None
    if not files:
        raise DataError(f"{url}: nothing there")
    key = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
    out = default_cache_dir() / "copies" / f"{Path(url).name}-{key}-{listing_digest(files)}"
    out.mkdir(parents=True, exist_ok=True)
    fs, root = filesystem(url)
    with FileLock(str(out) + ".lock"):
        for name, (size, _) in sorted(files.items()):
            target = out / name
            if target.is_file() and target.stat().st_size == size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            try:
                with fs.open_input_stream(f"{root}/{name}") as src, open(partial, "wb") as dst:
                    while chunk := src.read(16 << 20):
                        dst.write(chunk)
            except Exception as err:  # noqa: BLE001
                raise DataError(f"{url}/{name}: cannot read: {first_line(err)}") from None
            os.replace(partial, target)
    return out


def save_array(target: epath.Path, array: np.ndarray) -> None:
    with target.open("wb") as f:
        np.save(f, array)


def load_array(source: epath.Path) -> np.ndarray:
    """A local `.npy` memory-mapped; an object read whole (row writers read the encoded
    documents they need, a batch's worth each)."""
    if is_object_storage(source):
        return np.load(io.BytesIO(source.read_bytes()))
    return np.load(source, mmap_mode="r")


def remove_tree(path: epath.Path) -> None:
    if is_object_storage(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def upload(local_dir: Path, target: epath.Path) -> None:
    """Every file under `local_dir` to the same names under `target`."""
    for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        destination = target / file.relative_to(local_dir).as_posix()
        try:
            with open(file, "rb") as src, destination.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        except Exception as err:  # noqa: BLE001 - missing bucket, credentials, permissions alike
            raise DataError(f"{destination}: cannot write: {first_line(err)}") from None


def staging_dir(target: epath.Path) -> Path:
    """Where this host writes what goes to `target` first: `target` itself when local,
    else a directory of this host's cache named by the URI."""
    if not is_object_storage(target):
        return Path(target)
    key = hashlib.blake2b(target.as_posix().encode(), digest_size=8).hexdigest()
    return default_cache_dir() / "staging" / f"{target.name}-{key}"
