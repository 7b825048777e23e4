"""Orbax checkpoints written straight to object storage (`gs://`, `s3://`).

Two things orbax does not do by itself there:
- Commit: a directory rename is a copy on object storage, so a save killed during the
  rename would leave a step that looks complete. Object-storage checkpoints commit with
  orbax's own commit file instead (written last; a step without it is never listed).
- `s3://`: orbax builds TensorStore specs for `gs://` and local files only (its s3
  support is an open upstream change), although TensorStore has a native S3 driver. The
  spec orbax builds for an equivalent local path is rewritten to that driver, with the
  endpoint and region from the standard AWS environment. Everything else (directories,
  metadata, commit files) goes through orbax's own paths, which read `s3://` with s3fs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

# An absolute local path that stands for `s3://` while orbax builds a spec.
_S3_STAND_IN = "/__raysft_s3__/"


def object_storage_options():
    """CheckpointManager atomicity for object storage: commit files, never renames."""
    import orbax.checkpoint as ocp

    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def _s3_kvstore(path: str) -> dict[str, Any]:
    bucket, _, key = path.partition("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def _to_s3(spec: Any) -> Any:
    if isinstance(spec, dict):
        if spec.get("driver") == "file" and str(spec.get("path", "")).startswith(_S3_STAND_IN):
            return _s3_kvstore(spec["path"][len(_S3_STAND_IN):])
        return {k: _to_s3(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_to_s3(v) for v in spec]
    return spec


@functools.cache
def enable_s3() -> None:
    """Let orbax's TensorStore specs reach `s3://` (once per process)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    build = tensorstore_utils.build_kvstore_tspec

    @functools.wraps(build)
    def build_kvstore_tspec(directory, name=None, **kwargs):
        directory = str(directory)
        if not directory.startswith("s3://"):
            return build(directory, name, **kwargs)
        return _to_s3(build(_S3_STAND_IN + directory[len("s3://"):], name, **kwargs))

    # Every caller (array handlers, OCDBT merges) looks the function up on this module.
    tensorstore_utils.build_kvstore_tspec = build_kvstore_tspec
