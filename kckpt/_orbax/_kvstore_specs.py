"""Orbax's OCDBT key-value store spec for each array, built once per folder (TensorStore's ``to_json`` leaks).

Orbax 0.12 builds the spec of every array it writes or reads with
``tensorstore_utils._build_ocdbt_kvstore_tspec``, which resolves the
folder's base spec through ``ts.KvStore.Spec(...).to_json()``. TensorStore
0.1.86's ``to_json`` keeps a reference too many to each key and value of the
dict it returns, so each array saved or restored kept about 0.3 KB for good:
a training run saving a state of 9001 leaves grew by 2.8 MB a save.

The spec depends on the folder, the process's subfolder and the write
options; the array's name only sets its ``path``. Once installed (at the
first kckpt save or read), the builder is kckpt's: Orbax's own builder runs
once per folder and options (with no name), and each array gets a copy with
its ``path``: the same dict Orbax would build, for every caller in the
process. Recent folders are kept (`CACHED_FOLDERS`); a temporary-metadata
context (which kckpt does not use) goes to Orbax's builder each time.
"""

from __future__ import annotations

import collections
import copy
import threading
from typing import Any

from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install

CACHED_FOLDERS = 256  # (folder, options) specs kept: a few per step folder, for the steps read or written lately

_lock = threading.Lock()
_cache: collections.OrderedDict[tuple[str, str, str], dict[str, Any]] = collections.OrderedDict()
_original = _ts_utils._build_ocdbt_kvstore_tspec  # pylint: disable=protected-access
_installed = False


def _build_ocdbt_kvstore_tspec(
  directory: str,
  name: str | None = None,
  *,
  process_spec: Any = None,
  write_options: Any = None,
  temporary_metadata_context: Any = None,
) -> dict[str, Any]:
  """Orbax's builder, run once per (folder, process subfolder, write options); a copy per array."""
  if temporary_metadata_context is not None:
    return _original(
      directory,
      name,
      process_spec=process_spec,
      write_options=write_options,
      temporary_metadata_context=temporary_metadata_context,
    )
  key = (str(directory), repr(process_spec), repr(write_options))
  with _lock:
    spec = _cache.get(key)
    if spec is not None:
      _cache.move_to_end(key)
  if spec is None:
    spec = _original(directory, None, process_spec=process_spec, write_options=write_options)
    with _lock:
      _cache[key] = spec
      while len(_cache) > CACHED_FOLDERS:
        _cache.popitem(last=False)
  out = copy.deepcopy(spec)  # callers add to the spec they get
  if name is not None:
    out["path"] = name
  return out


def install() -> None:
  """Puts kckpt's builder in Orbax's place (once; the specs it returns are Orbax's)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internal: `build_kvstore_tspec` looks `_build_ocdbt_kvstore_tspec` up on its module.
      _ts_utils._build_ocdbt_kvstore_tspec = _build_ocdbt_kvstore_tspec  # pylint: disable=protected-access
      _installed = True


def installed() -> bool:
  return _installed and _ts_utils._build_ocdbt_kvstore_tspec is _build_ocdbt_kvstore_tspec  # pylint: disable=protected-access
