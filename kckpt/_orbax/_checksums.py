"""What kckpt adds to each array Orbax writes under a kckpt workdir: a CRC32C per shard, and statistics.

Orbax 0.12 has no hook per array. Two of its module-level functions are
wrapped (once, at the first kckpt writer; see `_reaches`), and act only for
arrays written under a folder that an open kckpt `Writer` registered
(`register`): arrays written anywhere else, by plain Orbax in the same
process included, are left exactly as Orbax writes them.

`serialization.async_serialize_from_host` gets each array's shards already
copied to host memory by Orbax (the copy every async save makes); alongside
the write, kckpt's one background thread (`_background`) reduces
them, in one pass over each shard in cache-sized blocks, to

- **statistics**: `kckpt._orbax._leafstats.Partial` values (count, non-finite
  count, sum, sum of squares, min, max);
- **checksums**: the CRC32C of each shard's bytes as written (`crc32c_of`:
  the ``crc32c`` package, the CPU's CRC instruction, 12-25 GB/s here,
  without the GIL), with the shard's box in the array (`box_of`),

for the step's `StatsCollector`. Nothing runs on the training thread, no
array is copied again, and the arrays' files are exactly Orbax's: plain Orbax
reads them. The checksums are written into the step (`CHECKSUMS_FILE`) and
checked by kckpt's reads (`kckpt._orbax._read_checks`).

Earlier development versions stored a Zarr v3 ``crc32c`` codec per chunk instead,
checked by TensorStore itself on every read (and still read so); its CRC32C is
absl's portable code in the TensorStore wheels, which cost a GPT-2-sized save
a third more CPU time than one without, and a restore 12-23%.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import crc32c as _crc32c
import numpy as np
from etils import epath
from orbax.checkpoint._src.serialization import serialization as _serialization  # Orbax 0.12 internal: see install
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install

from kckpt._orbax import _background, _leafstats

__all__ = ["Box", "box_of", "crc32c_of", "install", "installed", "leaf_checksums", "register"]

Box = tuple[tuple[int, int], ...]  # [start, stop) along each axis of an array


@dataclasses.dataclass
class _Root:
  writers: int = 0
  checksums: bool = True


_lock = threading.Lock()
_roots: dict[str, _Root] = {}  # "<checkpoints folder>/" -> what the writers there want
# id(write spec) -> (the spec, item folder, parameter name, checksums wanted), until serialized. The
# spec itself is held so that its id is not reused by another dict while the entry exists.
_owners: dict[int, tuple[dict[str, Any], str, str, bool]] = {}
_original_build = _ts_utils.build_array_write_spec
_original_serialize = _serialization.async_serialize_from_host
_installed = False


def _root_of(parent_dir: Any) -> tuple[str, _Root] | None:
  if parent_dir is None or not _roots:
    return None
  path = (parent_dir if isinstance(parent_dir, str) else epath.Path(parent_dir).as_posix()) + "/"
  for root, wanted in tuple(_roots.items()):
    if path.startswith(root):
      return root, wanted
  return None


def crc32c_of(array: np.ndarray, crc: int = 0) -> int:
  """The CRC32C of an array's bytes in C order, continuing `crc` (the CPU's CRC instruction, without the GIL).

  >>> hex(crc32c_of(np.frombuffer(b"123456789", np.uint8)))  # the CRC-32C check value
  '0xe3069283'
  >>> crc32c_of(np.frombuffer(b"6789", np.uint8), crc32c_of(np.frombuffer(b"12345", np.uint8))) == 0xE3069283
  True
  """
  flat = np.ascontiguousarray(array).reshape(-1)
  view = flat.view(np.uint8)
  return int(_crc32c.crc32c(view, value=crc, gil_release_mode=1))  # type: ignore[arg-type]


def box_of(index: Sequence[slice], shape: Sequence[int]) -> Box:
  """The box ([start, stop) per axis) that `index` (slices, as JAX and Orbax give shards) selects in `shape`.

  >>> box_of((slice(None), slice(2, 4)), (3, 8))
  ((0, 3), (2, 4))
  """
  return tuple(tuple(int(v) for v in sl.indices(size)[:2]) for sl, size in zip(index, shape, strict=True))  # type: ignore[misc]


def leaf_checksums(shape: Sequence[int], shards: Sequence[tuple[Box, np.ndarray]]) -> dict[str, Any]:
  """What a step records of some shards of one array (JSON): its dtype and shape, each shard's box and CRC32C.

  >>> leaf_checksums((2,), [(((0, 2),), np.array([1, 2], np.uint8))])
  {'dtype': 'uint8', 'shape': [2], 'shards': [[[[0, 2]], 66625362]]}
  """
  return _record(shape, shards, [crc32c_of(data) for _, data in shards])


def _record(shape: Sequence[int], shards: Sequence[tuple[Box, np.ndarray]], crcs: Sequence[int]) -> dict[str, Any]:
  """`leaf_checksums`, given each shard's CRC32C."""
  return {
    "dtype": np.dtype(shards[0][1].dtype).name if shards else "",
    "shape": [int(n) for n in shape],
    "shards": [[[list(axis) for axis in box], crc] for (box, _), crc in zip(shards, crcs, strict=True)],
  }


def _reduce(shards: list[tuple[Box, np.ndarray]], shape: Sequence[int], checksums: bool, what: str) -> tuple[Any, Any]:
  """On the background worker: the statistics of one array's shards, and their checksums (when wanted).

  One pass over each shard, in blocks that stay in the cache while both are
  computed (`_leafstats.blocks`). A failure of the statistics is logged and
  leaves them None (they must never fail a save); one of the checksums fails
  the save.
  """
  reducer: _leafstats.Reducer | None = _leafstats.Reducer()

  def failed() -> None:
    nonlocal reducer
    logging.getLogger("kckpt").exception("kckpt: the statistics of %s could not be computed", what)
    reducer = None

  crcs = []
  for _, data in shards:
    try:
      data = np.ascontiguousarray(data)
      floating = _leafstats.is_floating(data.dtype)
    except Exception:  # pylint: disable=broad-exception-caught
      if checksums:
        raise
      failed()
      continue
    crc = 0
    for block in _leafstats.blocks(data):
      if floating and reducer is not None:
        try:
          reducer.add(block)
        except Exception:  # pylint: disable=broad-exception-caught
          failed()
      if checksums:
        crc = crc32c_of(block, crc)
    crcs.append(crc)
  stats = reducer.partial() if reducer is not None else None
  return stats, _record(shape, shards, crcs) if checksums and shards else None


_last_parent: tuple[Any, str] = (None, "")  # the last item folder seen, as a string (one tuple: atomic for readers)


def _build_array_write_spec(info, *args, **kwargs):
  spec = _original_build(info, *args, **kwargs)
  # Orbax's `ParamInfo.parent_dir` property checks its value against a runtime Protocol (tens of µs per
  # array), and gives every array of an item the same folder object: one string per item.
  global _last_parent
  parent = getattr(info, "_parent_dir", None)
  if not isinstance(parent, (str, os.PathLike)):  # not a folder (yet): Orbax's property says why
    parent = getattr(info, "parent_dir", None)
  last = _last_parent
  if last[0] is not parent and parent is not None:
    last = _last_parent = (parent, epath.Path(parent).as_posix())
  found = _root_of(last[1]) if parent is not None else None
  if found is not None:
    _, wanted = found
    name = str(getattr(info, "name", "?"))
    # A cast on write (`SaveArgs(dtype=...)`) stores other bytes than the host shards hold: no checksum.
    checksums = wanted.checksums and spec.json.get("driver") != "cast"
    with _lock:
      _owners[id(spec.json)] = (spec.json, last[1], name, checksums)
  return spec


async def _serialize_from_host(rslices_on_host, tensorstore_spec, *args, **kwargs):
  with _lock:
    owner = _owners.pop(id(tensorstore_spec), None)
  if owner is not None and owner[0] is not tensorstore_spec:
    owner = None
  collector = _leafstats.collector_for(owner[1]) if owner is not None else None
  if owner is None or collector is None:
    return await _original_serialize(rslices_on_host, tensorstore_spec, *args, **kwargs)
  _, item_dir, name, checksums = owner
  shape = tuple(rslices_on_host.global_shape)
  shards = [(box_of(s.index, shape), s.unsliced_data) for s in rslices_on_host.replica_slices if s.is_on_host]
  results = await asyncio.gather(
    _original_serialize(rslices_on_host, tensorstore_spec, *args, **kwargs),
    _background.run(_reduce, shards, shape, checksums, f"{item_dir}/{name}"),
  )
  stats, sums = results[1]
  collector.add(_leafstats.item_name(epath.Path(item_dir).name), name, stats, nbytes=int(rslices_on_host.nbytes), checksums=sums)
  return None


def _forget_specs_under(step_dir: str) -> None:
  """Drops the specs of arrays never serialized here (NumPy leaves) once their step's collector closes."""
  step_dir = step_dir.rstrip("/")
  prefixes = (step_dir + "/", step_dir + ".")  # the step folder, and its temporary name (ckpt_5.orbax-checkpoint-tmp-...)
  with _lock:
    for key, (_, item_dir, *_) in list(_owners.items()):
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
  """Arrays written under `directory` get statistics, and a CRC32C per shard when `checksums`, until closed."""
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
      for key, (_, item_dir, *_) in list(_owners.items()):  # specs of arrays never serialized (NumPy leaves)
        if item_dir.startswith(root):
          del _owners[key]

  stack = contextlib.ExitStack()
  stack.callback(unregister)
  return stack
