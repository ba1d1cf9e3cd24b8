"""Checksums of array data: a CRC32C per chunk, written and checked by TensorStore.

Zarr v3 has a ``crc32c`` codec: TensorStore appends the CRC32C of each chunk
when it writes it (in its own I/O threads, with the CPU's CRC instruction) and
checks it on every read, failing with ``DATA_LOSS: ... Digest mismatch``. A
reader needs nothing from kckpt: the codec is in each array's ``zarr.json``,
so plain Orbax and TensorStore read (and check) these checkpoints too.

Orbax 0.12 has no option for codecs. Its Zarr v3 arrays are written with a
``sharding_indexed`` codec whose one inner chunk is the whole chunk (its
index has a CRC32C, the data none). For arrays written under a workdir that a
kckpt `Writer` registered (`writing_with_checksums`), the spec built by
`tensorstore_utils.build_array_write_spec` is changed to the inner chunk's
codecs followed by ``crc32c``: the same chunks, one read each, with a
checksum. Arrays written anywhere else, by plain Orbax in the same process
included, are left as Orbax builds them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from etils import epath
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install

from kckpt._orbax._format import CRC32C  # the step's ``checksums`` entry when its arrays carry them

__all__ = ["CRC32C", "install", "installed", "register", "with_crc32c", "writing_with_checksums"]

_lock = threading.Lock()
_roots: dict[str, int] = {}  # workdir prefix -> how many writers registered it
_original_build = _ts_utils.build_array_write_spec
_installed = False


def _under_registered_root(parent_dir: Any) -> bool:
  if parent_dir is None or not _roots:
    return False
  path = epath.Path(parent_dir).as_posix() + "/"
  return any(path.startswith(root) for root in tuple(_roots))


def with_crc32c(spec: dict[str, Any], name: str) -> None:
  """Changes a Zarr v3 write spec built by Orbax (in place) so that each chunk carries a CRC32C.

  >>> spec = {"driver": "zarr3", "metadata": {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
  ...   "codecs": [{"name": "sharding_indexed", "configuration": {"chunk_shape": [4],
  ...     "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}}]}}
  >>> with_crc32c(spec, "w")
  >>> [c["name"] for c in spec["metadata"]["codecs"]]
  ['bytes', 'crc32c']
  """
  target = spec.get("base", spec) if spec.get("driver") == "cast" else spec
  metadata = target.get("metadata") or {}
  codecs = metadata.get("codecs")
  grid = metadata.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
  if (
    target.get("driver") != "zarr3"
    or not isinstance(codecs, list)
    or len(codecs) != 1
    or codecs[0].get("name") != "sharding_indexed"
    or codecs[0].get("configuration", {}).get("chunk_shape") != grid
  ):
    raise RuntimeError(
      f"kckpt cannot add checksums to array {name!r}: this Orbax version writes Zarr metadata kckpt does not know"
      f" ({codecs!r}). Save with kckpt.StorageOptions(checksums=False), or use the orbax-checkpoint version kckpt pins."
    )
  metadata["codecs"] = [*codecs[0]["configuration"]["codecs"], {"name": "crc32c"}]


def _build_array_write_spec(info, *args, **kwargs):
  spec = _original_build(info, *args, **kwargs)
  if getattr(info, "use_zarr3", False) and _under_registered_root(getattr(info, "parent_dir", None)):
    with_crc32c(spec.json, str(getattr(info, "name", "?")))
  return spec


def install() -> None:
  """Hooks Orbax's array spec builder (once; it changes nothing until a root is registered)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internal: the module-level builder that jax_array_handlers and
      # type_handlers call (as `ts_utils.build_array_write_spec`) for every array leaf.
      _ts_utils.build_array_write_spec = _build_array_write_spec
      _installed = True


def installed() -> bool:
  return _installed and _ts_utils.build_array_write_spec is _build_array_write_spec


@contextlib.contextmanager
def writing_with_checksums(directory: epath.Path | str) -> Iterator[None]:
  """Arrays written under `directory` while the context is open carry a CRC32C per chunk."""
  root = epath.Path(directory).as_posix().rstrip("/") + "/"
  install()
  with _lock:
    _roots[root] = _roots.get(root, 0) + 1
  try:
    yield
  finally:
    with _lock:
      _roots[root] -= 1
      if not _roots[root]:
        del _roots[root]


def register(directory: epath.Path | str) -> contextlib.ExitStack:
  """`writing_with_checksums` as an object to close later (a `Writer` holds it until `close`)."""
  stack = contextlib.ExitStack()
  stack.enter_context(writing_with_checksums(directory))
  return stack
