"""The one change kckpt makes to Orbax's behaviour, installed explicitly and once.

Nothing here runs at import: `import kckpt` leaves Orbax (and absl logging) as
they are for other code in the process. `install_s3_support()` is called at
the first ``s3://`` path kckpt touches (`kckpt.cloud.prepare`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from orbax.checkpoint._src.path import gcs_utils as _gcs_utils  # Orbax 0.12 internal: see install_s3_support
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install_s3_support

from kckpt import cloud

_install_lock = threading.Lock()
_s3_installed = False


# ---------------------------------------------------------------------------
# s3:// support (Orbax 0.12.8 internals)
# ---------------------------------------------------------------------------
#
# Orbax 0.12.8 builds TensorStore kvstore specs in
# `orbax.checkpoint._src.serialization.tensorstore_utils`
# (`_build_ocdbt_kvstore_tspec`, `_build_non_ocdbt_kvstore_tspec`). It knows
# only gs:// as a remote scheme: `_normalize_path` runs `os.path.normpath`,
# which turns ``s3://b/k`` into ``s3:/b/k``, and then, as the path is not
# absolute, raises "Checkpoint path should be absolute. Got s3:/b/k" (S3 is an
# open Orbax request, #359). TensorStore itself has an ``s3`` kvstore driver
# (OCDBT on top of it works), so kckpt hooks three module-level functions,
# each changed for s3:// paths only (every other path goes to Orbax's own code):
#
# - `tensorstore_utils._normalize_path`: keeps the ``s3://`` of a path;
# - `tensorstore_utils._use_gcs_driver`: says "object store" for s3:// too, so
#   the spec builders take their remote branch, which calls
# - `gcs_utils.get_kvstore_for_gcs`: returns TensorStore's ``s3`` spec
#   (bucket, path, ``endpoint``, ``aws_region`` from `kckpt.cloud`).
#
# Finishing: on S3 a rename is a copy, so an s3:// `Writer` passes Orbax's own
# `CommitFileTemporaryPath` (what Orbax picks for gs://): the step is written
# in place and ``commit_success.txt`` is written last; kckpt's listing counts
# only steps that have it. Checked against orbax-checkpoint 0.12.8; the
# pyproject pin (<0.13) keeps an upgrade from silently changing these.

_ORIGINAL_NORMALIZE_PATH = _ts_utils._normalize_path  # pylint: disable=protected-access
_ORIGINAL_USE_GCS_DRIVER = _ts_utils._use_gcs_driver  # pylint: disable=protected-access
_ORIGINAL_GET_KVSTORE_FOR_GCS = _gcs_utils.get_kvstore_for_gcs


def _normalize_path(path: str) -> str:
  if cloud.is_s3(path):
    return cloud.S3_SCHEME + os.path.normpath(path[len(cloud.S3_SCHEME) :])
  return _ORIGINAL_NORMALIZE_PATH(path)


def _use_gcs_driver(directory: str) -> bool:
  return cloud.is_s3(directory) or _ORIGINAL_USE_GCS_DRIVER(directory)


def _get_kvstore(path: str) -> dict[str, Any]:
  if cloud.is_s3(path):
    return cloud.s3_kvstore_spec(path)
  return _ORIGINAL_GET_KVSTORE_FOR_GCS(path)


def install_s3_support() -> None:
  """Makes Orbax 0.12.8 write and read s3:// paths through TensorStore's ``s3`` driver.

  Idempotent and thread-safe; called by `kckpt.cloud.prepare` at the first
  ``s3://`` path. Paths of other schemes keep going to Orbax's own code.
  """
  global _s3_installed
  with _install_lock:
    if _s3_installed:
      return
    _ts_utils._normalize_path = _normalize_path  # pylint: disable=protected-access
    _ts_utils._use_gcs_driver = _use_gcs_driver  # pylint: disable=protected-access
    _gcs_utils.get_kvstore_for_gcs = _get_kvstore  # type: ignore[assignment]  # same signature, other parameter name
    _s3_installed = True


def s3_support_installed() -> bool:
  return _s3_installed
