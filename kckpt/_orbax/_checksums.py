"""What kckpt adds to each array Orbax writes under a kckpt workdir: a CRC32C per chunk, and statistics.

Orbax 0.12 has no hook per array. Two of its module-level functions are
wrapped (once, at the first kckpt writer; see `_reaches`), and act only for
arrays written under a folder that an open kckpt `Writer` registered
(`register`): arrays written anywhere else, by plain Orbax in the same
process included, are left exactly as Orbax writes them.

**Checksums.** Zarr v3 has a ``crc32c`` codec: TensorStore appends the CRC32C
of each chunk when it writes it (in its own I/O threads; absl's portable
CRC32C code in the wheels measured, not the CPU's CRC instruction) and checks
it on every read, failing with ``DATA_LOSS: ...
Digest mismatch``. A reader needs nothing from kckpt: the codec is in each
array's ``zarr.json``, so plain Orbax and TensorStore read (and check) these
checkpoints too. Orbax writes its Zarr v3 arrays with a ``sharding_indexed``
codec whose one inner chunk is the whole chunk (its index has a CRC32C, the
data none); `tensorstore_utils.build_array_write_spec`'s result is changed
(`with_crc32c`): a chunk of up to 2 MiB gets the inner chunk's codecs followed
by ``crc32c`` (one read, as before), a larger one keeps the sharding codec
with sub-chunks of about 1 MiB, each followed by ``crc32c``, which TensorStore
reads and checks in parallel.

**Statistics.** `serialization.async_serialize_from_host` gets each array's
shards already copied to host memory by Orbax (the copy every async save
makes); alongside the write, a worker thread reduces them to
`kckpt._orbax._leafstats.Partial` values (count, non-finite count, sum, sum
of squares, min, max) for the step's `StatsCollector`. Nothing runs on the
training thread and no array is copied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import threading
from collections.abc import Sequence
from typing import Any

from etils import epath
from orbax.checkpoint._src.serialization import serialization as _serialization  # Orbax 0.12 internal: see install
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install

from kckpt._orbax import _leafstats
from kckpt._orbax._format import CRC32C  # the step's ``checksums`` entry when its arrays carry them

__all__ = ["CRC32C", "install", "installed", "register", "with_crc32c"]


@dataclasses.dataclass
class _Root:
  writers: int = 0
  checksums: bool = True


_lock = threading.Lock()
_roots: dict[str, _Root] = {}  # "<checkpoints folder>/" -> what the writers there want
# id(write spec) -> (the spec, item folder, parameter name), until serialized. The spec itself is
# held so that its id is not reused by another dict while the entry exists.
_owners: dict[int, tuple[dict[str, Any], str, str]] = {}
_original_build = _ts_utils.build_array_write_spec
_original_serialize = _serialization.async_serialize_from_host
_installed = False


def _root_of(parent_dir: Any) -> tuple[str, _Root] | None:
  if parent_dir is None or not _roots:
    return None
  path = epath.Path(parent_dir).as_posix() + "/"
  for root, wanted in tuple(_roots.items()):
    if path.startswith(root):
      return root, wanted
  return None


# Arrays whose chunk is over twice this are stored as sub-chunks of about this size, each with a CRC32C
# (a GPT-2-sized state restored faster with 1 MiB than with 2 or 4 MiB, from the page cache and from disk).
SUB_CHUNK_BYTES = 1 << 20


def sub_chunk_shape(shape: Sequence[int], itemsize: int, target_bytes: int = SUB_CHUNK_BYTES) -> tuple[int, ...]:
  """A shape that divides `shape` (as Zarr's sharding needs) into pieces of about `target_bytes`.

  Splits the leading axes first (each piece then is contiguous), taking the
  divisor of an axis whose piece is nearest to `target_bytes` on a log scale;
  an axis of one piece's bytes still over twice the target is cut to 1 and the
  next axis is split.

  >>> sub_chunk_shape((8192, 8192), 4)  # 256 MiB of float32: 1 MiB pieces of 32 rows
  (32, 8192)
  >>> sub_chunk_shape((50257, 768), 4)  # 50257 = 29 * 1733: pieces of 1733 rows (5.1 MiB; 29 rows: 87 KiB)
  (1733, 768)
  >>> sub_chunk_shape((64, 64), 4)  # small: one piece
  (64, 64)
  """
  shape = tuple(max(1, int(d)) for d in shape)
  out = list(shape)
  for axis, size in enumerate(shape):
    rest = itemsize * math.prod(shape[axis + 1 :])  # bytes of one index along this axis
    if size * rest <= 2 * target_bytes:
      break
    out[axis] = min(_divisors(size), key=lambda d: abs(math.log(d * rest / target_bytes)))
    if out[axis] * rest <= 2 * target_bytes or out[axis] > 1:
      break
  return tuple(out)


def _itemsize(data_type: str) -> int:
  """Bytes per element of a Zarr v3 data type (``float32``: 4, ``bfloat16``: 2, ``bool``: 1; sub-byte: 1)."""
  bits = re.search(r"\d+", data_type)
  return max(1, int(bits.group()) // 8) if bits else 1


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted({*small, *(n // d for d in small)})


def with_crc32c(spec: dict[str, Any], name: str) -> None:
  """Changes a Zarr v3 write spec built by Orbax (in place) so that each chunk carries a CRC32C.

  A chunk of at most twice `SUB_CHUNK_BYTES` becomes one piece with the codecs
  ``bytes, crc32c``: one read, as Orbax's layout. A larger one keeps Orbax's
  ``sharding_indexed`` codec, with sub-chunks of about `SUB_CHUNK_BYTES`
  (`sub_chunk_shape`) each carrying a CRC32C: TensorStore decodes and checks
  them in parallel, where a single big chunk is copied and checked by one
  thread (a 256 MiB array: 0.55 s to read without checksums in one chunk,
  0.53 s with them in sub-chunks, 0.88 s with them in one chunk).

  >>> spec = {"driver": "zarr3", "dtype": "float32", "metadata": {
  ...   "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
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
  sharding = codecs[0]["configuration"]
  inner_codecs = [*sharding["codecs"], {"name": "crc32c"}]
  itemsize = _itemsize(str(target.get("dtype") or metadata.get("data_type") or ""))  # the stored dtype
  pieces = sub_chunk_shape(grid, itemsize)
  if list(pieces) == [max(1, d) for d in grid]:
    metadata["codecs"] = inner_codecs
  else:
    sharding["chunk_shape"] = list(pieces)
    sharding["codecs"] = inner_codecs


def _build_array_write_spec(info, *args, **kwargs):
  spec = _original_build(info, *args, **kwargs)
  found = _root_of(getattr(info, "parent_dir", None))
  if found is not None:
    _, wanted = found
    name = str(getattr(info, "name", "?"))
    if wanted.checksums and getattr(info, "use_zarr3", False):
      with_crc32c(spec.json, name)
    with _lock:
      _owners[id(spec.json)] = (spec.json, epath.Path(info.parent_dir).as_posix(), name)
  return spec


async def _serialize_from_host(rslices_on_host, tensorstore_spec, *args, **kwargs):
  with _lock:
    owner = _owners.pop(id(tensorstore_spec), None)
  if owner is not None and owner[0] is not tensorstore_spec:
    owner = None
  collector = _leafstats.collector_for(owner[1]) if owner is not None else None
  if owner is None or collector is None:
    return await _original_serialize(rslices_on_host, tensorstore_spec, *args, **kwargs)
  _, item_dir, name = owner
  shards = [s.unsliced_data for s in rslices_on_host.replica_slices if s.is_on_host]
  results = await asyncio.gather(
    _original_serialize(rslices_on_host, tensorstore_spec, *args, **kwargs),
    asyncio.to_thread(_leafstats.reduce_shards_or_none, shards, f"{item_dir}/{name}"),
  )
  collector.add(_leafstats.item_name(epath.Path(item_dir).name), name, results[1], nbytes=int(rslices_on_host.nbytes))
  return None


def _forget_specs_under(step_dir: str) -> None:
  """Drops the specs of arrays never serialized here (NumPy leaves) once their step's collector closes."""
  step_dir = step_dir.rstrip("/")
  prefixes = (step_dir + "/", step_dir + ".")  # the step folder, and its temporary name (ckpt_5.orbax-checkpoint-tmp-...)
  with _lock:
    for key, (_, item_dir, _) in list(_owners.items()):
      if item_dir.startswith(prefixes):
        del _owners[key]


def install() -> None:
  """Hooks Orbax's array spec builder and host serializer (once; they change nothing until a root is registered)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internals: module-level functions that jax_array_handlers and
      # type_handlers look up on their modules (`ts_utils.build_array_write_spec`,
      # `serialization.async_serialize_from_host`) for every array leaf.
      _ts_utils.build_array_write_spec = _build_array_write_spec
      _serialization.async_serialize_from_host = _serialize_from_host
      _leafstats.on_close(_forget_specs_under)
      _installed = True


def installed() -> bool:
  return (
    _installed
    and _ts_utils.build_array_write_spec is _build_array_write_spec
    and _serialization.async_serialize_from_host is _serialize_from_host
  )


def register(directory: epath.Path | str, *, checksums: bool) -> contextlib.ExitStack:
  """Arrays written under `directory` get statistics, and a CRC32C per chunk when `checksums`, until closed."""
  root = epath.Path(directory).as_posix().rstrip("/") + "/"
  install()
  with _lock:
    wanted = _roots.setdefault(root, _Root(checksums=checksums))
    wanted.writers += 1
    wanted.checksums = checksums

  def unregister() -> None:
    with _lock:
      wanted.writers -= 1
      if not wanted.writers:
        _roots.pop(root, None)
      for key, (_, item_dir, _) in list(_owners.items()):  # specs of arrays never serialized (NumPy leaves)
        if item_dir.startswith(root):
          del _owners[key]

  stack = contextlib.ExitStack()
  stack.callback(unregister)
  return stack
