"""Where a model's files come from, resolved on each host that reads them.

A model is named as the user gave it: a directory (on storage every host sees), a `.gguf`
file, a hub id, or an object-storage URI (`s3://`, `gs://`). The driver fetches only the
config and the tokenizer; every training host fetches (or converts) the weights into its
own cache, so no host ever reads another host's local disk. The driver pins what it read
(the hub commit, the objects' sizes and times) and every host loads exactly that.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

from raysft.storage.errors import DataError
from raysft.storage.files import REMOTE_SCHEMES, filesystem, first_line, unsupported_scheme
from raysft.storage.locations import listing_digest as _listing_digest
from raysft.storage.locations import local_copy
from raysft.workers.models.config import ModelLoadError
from raysft.workers.models.gguf_import import convert_gguf

WEIGHT_FILES = ["*.safetensors"]
# Everything else a Hugging Face model directory holds that training or export uses.
CONFIG_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
MODEL_SCHEMES = tuple(s for s in REMOTE_SCHEMES if s != "hf")  # hf:// models are hub ids


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "://" not in name


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """`name`: an absolute local path, a hub id or a URI; `pin`: the hub commit or the
    object listing's digest the driver saw (None for local paths)."""

    name: str
    pin: str | None = None

    @classmethod
    def parse(cls, text: str | Path) -> "ModelSource":
        """What `str(source)` wrote: `name` or `name@pin`; a plain path or id as given."""
        text = str(text)
        if "://" in text:
            if text.split("://", 1)[0] not in MODEL_SCHEMES:
                raise ModelLoadError(f"model {unsupported_scheme(text, MODEL_SCHEMES, 'a local path, a hub id')}")
            name, _, pin = text.partition("@")
            return cls(name.rstrip("/"), pin or None)
        if _looks_like_repo_id(text.partition("@")[0]) and not Path(text).expanduser().exists():
            name, _, pin = text.partition("@")
            return cls(name, pin or None)
        return cls(str(Path(text).expanduser().absolute()))

    def __str__(self) -> str:
        return f"{self.name}@{self.pin}" if self.pin else self.name

    @property
    def kind(self) -> str:
        if "://" in self.name:
            return "object"
        if Path(self.name).is_absolute():
            return "gguf" if self.name.endswith(".gguf") else "local"
        return "hub"

    def pinned(self) -> "ModelSource":
        """This source with what the driver sees now pinned (the config and tokenizer are
        fetched on the way): every host then loads that revision or fails saying why."""
        if self.kind == "hub" and self.pin is None:
            return ModelSource(self.name, self._hub_download(CONFIG_FILES).name)
        if self.kind == "object" and self.pin is None:
            return ModelSource(self.name, _listing_digest(self.listing()))
        return self

    def fetch(self, weights: bool = True) -> Path:
        """A local Hugging Face directory on this host: config and tokenizer files, and the
        weights unless `weights=False` (the driver, the planner)."""
        patterns = CONFIG_FILES + WEIGHT_FILES if weights else CONFIG_FILES
        if self.kind == "hub":
            return self._hub_download(patterns)
        if self.kind == "object":
            return self._object_download(patterns)
        path = Path(self.name)
        if self.kind == "gguf":
            return convert_gguf(path)
        if path.name == "config.json" and path.is_file() and not weights:
            return path.parent
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"model directory {path} has no config.json")
            return path
        if path.exists():
            raise ModelLoadError(f"model path {path} is neither a directory nor a .gguf file")
        raise ModelLoadError(f"model directory not found: {path}")

    def _hub_download(self, patterns: list[str]) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(self.name, revision=self.pin, allow_patterns=patterns))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            at = f" at revision {self.pin}" if self.pin else ""
            raise ModelLoadError(
                f"model {self.name!r}{at} is not a local directory and the hub download failed: {first_line(err)}"
            ) from None

    def listing(self) -> dict[str, tuple[int, int]]:
        """Files directly under the URI: name -> (size, mtime in ns)."""
        import pyarrow.fs as pafs

        fs, path = _model_filesystem(self.name)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        except FileNotFoundError:
            raise ModelLoadError(f"model not found: {self.name}") from None
        except Exception as err:  # noqa: BLE001 - credentials, missing bucket, network alike
            raise ModelLoadError(f"model {self.name}: cannot list: {first_line(err)}") from None
        files = {Path(i.path).name: (i.size, i.mtime_ns or 0) for i in infos if i.is_file}
        if "config.json" not in files:
            raise ModelLoadError(f"model {self.name} has no config.json")
        return files

    def _object_download(self, patterns: list[str]) -> Path:
        """The matching files in this host's cache (`locations.local_copy`); a model whose
        objects changed since the driver pinned them is refused."""
        listing = self.listing()
        digest = _listing_digest(listing)
        if self.pin and digest != self.pin:
            raise ModelLoadError(
                f"model {self.name} changed after the run started (listing {digest}, the driver read {self.pin})"
            )
        wanted = {n: v for n, v in listing.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}
        try:
            return local_copy(self.name, files=wanted)
        except DataError as err:
            raise ModelLoadError(f"model {err}") from None


def _model_filesystem(url: str):
    try:
        return filesystem(url)
    except ValueError as err:
        raise ModelLoadError(f"model {first_line(err)}") from None


