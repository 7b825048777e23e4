"""The one private orbax function raysft replaces (`enable_s3`: orbax builds TensorStore
specs for gs:// and local paths only) held to what the replacement relies on, so an orbax
release that changes it fails here, by name, before any checkpoint reaches S3."""

from __future__ import annotations

import inspect

import pytest
from orbax.checkpoint._src.serialization import ocdbt_utils, tensorstore_utils, type_handlers

from raysft.workers.checkpoints.object_checkpoints import _S3_STAND_IN, enable_s3

PINNED = "orbax.checkpoint._src.serialization.tensorstore_utils.build_kvstore_tspec"


def _kvstores(spec):
    """Every kvstore of a spec, nested ones (OCDBT's base) included."""
    if isinstance(spec, dict):
        if "driver" in spec:
            yield spec
        for value in spec.values():
            yield from _kvstores(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from _kvstores(value)


def test_the_replaced_orbax_function_still_has_the_shape_raysft_relies_on():
    signature = inspect.signature(tensorstore_utils.build_kvstore_tspec.__wrapped__
                                  if hasattr(tensorstore_utils.build_kvstore_tspec, "__wrapped__")
                                  else tensorstore_utils.build_kvstore_tspec)
    assert list(signature.parameters)[:2] == ["directory", "name"], f"{PINNED} changed its arguments: {signature}"
    # Its callers look it up on the module at call time (so replacing it there reaches them).
    for module in (type_handlers, ocdbt_utils):
        assert "ts_utils.build_kvstore_tspec(" in inspect.getsource(module), (
            f"{module.__name__} no longer calls {PINNED} through its module: enable_s3 would not reach it"
        )


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_a_local_stand_in_path_becomes_tensorstores_s3_driver(monkeypatch, use_ocdbt):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    # What enable_s3 rewrites: orbax's spec of a local path is a "file" kvstore of that path.
    local = tensorstore_utils.build_kvstore_tspec(_S3_STAND_IN + "bucket/run/7", "params.w", use_ocdbt=use_ocdbt)
    files = [k for k in _kvstores(local) if k["driver"] == "file"]
    assert files and all(k["path"].startswith(_S3_STAND_IN + "bucket/run/7") for k in files), (
        f"{PINNED} no longer builds a 'file' kvstore for a local path: {local}"
    )
    enable_s3()
    spec = tensorstore_utils.build_kvstore_tspec("s3://bucket/run/7", "params.w", use_ocdbt=use_ocdbt)
    stores = list(_kvstores(spec))
    assert not [k for k in stores if k["driver"] == "file"], spec
    s3 = [k for k in stores if k["driver"] == "s3"]
    assert s3 and all(k["bucket"] == "bucket" and k["path"].startswith("run/7") for k in s3), spec
    assert all(k["endpoint"] == "http://127.0.0.1:9" and k["aws_region"] == "eu-west-1" for k in s3)
    # gs:// and local paths are orbax's own, untouched.
    assert tensorstore_utils.build_kvstore_tspec("gs://b/run", "w", use_ocdbt=use_ocdbt) == \
        tensorstore_utils.build_kvstore_tspec.__wrapped__("gs://b/run", "w", use_ocdbt=use_ocdbt)
