"""Checked reads of saved shards straight from their OCDBT data files: one copy, each slab hashed while in the cache.

A restore of a step saved with checksums reads most of its bytes as whole
saved shards (a restore onto the saved sharding, or on one process).
Through TensorStore, each shard's bytes go from the page cache into
TensorStore's buffer, from there into the shard's array, and then kckpt's
CRC32C reads them once more from memory: on a host whose cores are busy
with the read, that last pass cost checked restores of GPT-2-sized states
6-10% (the integrity guide has the figures).

Here a saved shard stored the way kckpt saves by default (Zarr v2 chunks
without compression in an OCDBT database on a local disk, one chunk per
shard) is read with ``preadv`` from its data file straight into the
shard's array, in slabs of `SLAB_BYTES`, and each slab is hashed right after
it is read, while its bytes are still in the cache. Where the value
lies comes from the database's index (`_ocdbt`, read once per item while
a restore's checks of its step are open). The shard's shape and dtype are
the ones Orbax would read into, and only a value of exactly their size, in
an uncompressed little-endian C-order Zarr v2 chunk the size of the shard,
is read. Its bytes are returned only when their CRC32C is the one recorded
at save (as for every checked read, a 2^-32 chance of a damaged shard
passing); otherwise the shard is read again through TensorStore and
checked there, which raises the usual mismatch error naming the step, item
and leaf if the data is damaged. The
same happens for anything this path does not take (another format,
compression, a remote folder, a resharded or cast read, a platform without
``os.preadv``): TensorStore reads it, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kckpt._orbax import _drain, _format
from kckpt._orbax._checksums import Box
from kckpt._orbax._checksums import crc32c_of

__all__ = ["read_saved_shard", "scope"]

# Read, then hashed while in the cache. Each slab takes the GIL twice (after the read, after the hash): with
# 1 MiB slabs those hand-offs slowed the event loop's thread, and GPT-2 restores took 7-12% longer than with
# 4 MiB ones, from the page cache and from disk (16 alternated rounds each, 2 cores; 8 MiB and 16 MiB: the same).
SLAB_BYTES = 4 << 20
# Values up to this size are stored inside the OCDBT index (Orbax's `max_inline_value_bytes`): not looked up.
INLINE_VALUE_BYTES = 1024
HUGE_PAGE_ADVICE_BYTES = 1 << 22  # NumPy's threshold for asking for transparent huge pages (see `_buffer`)
READ_THREADS = 4  # shards read and hashed at once: 8 or 16 (with or without readahead hints) did no better from disk

_log = logging.getLogger("kckpt")
_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
# Item folder -> its index (None: no fast path for it), loaded once while a restore of its step is open.
_indexes: dict[str, concurrent.futures.Future[_Item | None]] = {}
_open_steps: dict[str, int] = {}  # step folder -> open scopes
_available = hasattr(os, "preadv")
_NOWAIT = getattr(os, "RWF_NOWAIT", 0) if hasattr(os, "posix_fadvise") else 0


def _forget_in_child() -> None:
  global _executor, _lock
  _executor, _lock = None, threading.Lock()
  _indexes.clear()
  _open_steps.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _worker() -> concurrent.futures.ThreadPoolExecutor:
  global _executor
  with _lock:
    if _executor is None:
      _executor = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kckpt-read")
    return _executor


@dataclasses.dataclass(frozen=True, slots=True)
class _Item:
  """What the fast path needs of one item's OCDBT database: where each chunk lies, and each array's Zarr metadata."""

  indirect: dict[bytes, Any]  # key -> `_ocdbt.ValueRef`
  inline: dict[bytes, bytes]
  arrays: dict[str, tuple[tuple[int, ...], str] | None] = dataclasses.field(default_factory=dict)  # name -> chunks, sep


@contextlib.contextmanager
def scope(step_key: str) -> Iterator[None]:
  """While inside, shards of the step at `step_key` (a folder, as a string) may be read by `read_saved_shard`."""
  with _lock:
    _open_steps[step_key] = _open_steps.get(step_key, 0) + 1
  try:
    yield
  finally:
    with _lock:
      count = _open_steps.pop(step_key) - 1
      if count:
        _open_steps[step_key] = count
      else:
        for item in [i for i in _indexes if i.startswith(f"{step_key}/")]:
          del _indexes[item]


def _load(item_dir: str) -> _Item | None:
  from kckpt._orbax import _ocdbt  # pylint: disable=import-outside-toplevel

  try:
    with open(os.path.join(item_dir, _format.ITEM_METADATA_FILE), "rb") as f:
      meta = json.loads(f.read())
    if not isinstance(meta, dict) or meta.get("use_ocdbt") is not True or meta.get("use_zarr3") is not False:
      return None
    index = _ocdbt.read_index(item_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught  # TensorStore's read says what is wrong
    _log.debug("kckpt: no direct reads of %s: %s", item_dir, e)
    return None
  return _Item(index.indirect, index.inline)


def _index_of(item_dir: str) -> concurrent.futures.Future[_Item | None]:
  worker = _worker()
  with _lock:
    found = _indexes.get(item_dir)
    if found is None or found.cancelled():  # (a load is never cancelled, its waiters are shielded: belt and braces)
      found = worker.submit(_load, item_dir)
      if item_dir.rpartition("/")[0] in _open_steps:
        _indexes[item_dir] = found
    return found


def _chunking(item: _Item, name: str) -> tuple[tuple[int, ...], str] | None:
  """The chunk shape and key separator of array `name`, when its chunks are stored as their bytes (else None)."""
  if name in item.arrays:
    return item.arrays[name]
  found = None
  raw = item.inline.get(f"{name}/.zarray".encode())
  try:
    zarray = json.loads(raw) if raw is not None else {}
    if (
      isinstance(zarray, dict)
      and zarray.get("zarr_format") == 2
      and zarray.get("compressor") is None
      and not zarray.get("filters")
      and zarray.get("order") == "C"
      and not str(zarray.get("dtype", ">")).startswith(">")
    ):
      found = (tuple(int(c) for c in zarray["chunks"]), str(zarray.get("dimension_separator", ".")))
  except (ValueError, TypeError, KeyError, AttributeError):  # not JSON, or not the JSON of a Zarr v2 array
    found = None
  item.arrays[name] = found  # one writer at a time would do; a race writes the same value
  return found


def _read_ahead_unless_cached(fd: int, offset: int, view: np.ndarray) -> None:
  """Asks the kernel to read the whole shard ahead when its first slab is not in the page cache.

  From disk, slab after slab on a few threads kept fewer reads in flight
  than TensorStore's reads of whole shards; from the page cache, the hint
  itself costs time (a walk over the shard's pages), so it is given only
  when the first slab is not there (``RWF_NOWAIT``: a read that would wait
  for the disk returns at once instead).
  """
  try:
    cached = os.preadv(fd, [view[: min(view.nbytes, 4096)].data], offset, _NOWAIT) > 0
  except BlockingIOError:
    cached = False
  except OSError:  # RWF_NOWAIT refused (an older kernel or another file system): no hint
    return
  if not cached:
    os.posix_fadvise(fd, offset, view.nbytes, os.POSIX_FADV_WILLNEED)


def _buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array for a shard; from 4 MiB on, a private mapping of its own, without huge pages.

  Two reasons. NumPy asks Linux for transparent huge pages for arrays from
  4 MiB on; filled by ``preadv``, such an array was zeroed 2 MiB at a time
  by the kernel inside each read (``perf``: 2.7x the page zeroing of an
  unchecked restore), and GPT-2 restores from disk took 1.2-1.3x as long as
  unchecked ones in a process that had saved before (0.92x with NumPy's
  advice turned off; 16 alternated rounds each, 2 cores). And a mapping is
  page-aligned, so JAX on CPU takes it as the restored array's buffer
  instead of copying it (a NumPy array of that size starts 16 bytes into its
  allocation). The mapping lives as long as the array or a JAX array on it.
  Where no mapping can be made (``vm.max_map_count`` reached), NumPy's.
  """
  nbytes = math.prod(shape) * dtype.itemsize
  if nbytes < HUGE_PAGE_ADVICE_BYTES:
    return np.empty(shape, dtype)
  try:
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # (anonymous: fd -1)
  except OSError:
    return np.empty(shape, dtype)
  if hasattr(mmap, "MADV_NOHUGEPAGE"):
    try:
      region.madvise(mmap.MADV_NOHUGEPAGE)  # where the system gives huge pages to every mapping
    except OSError:  # a kernel without transparent huge pages
      pass
  return np.frombuffer(region, dtype=dtype).reshape(shape)


def _never() -> bool:
  return False


def _read(path: str, offset: int, out: np.ndarray, stopped: Callable[[], bool] = _never) -> int:
  """Reads ``out.nbytes`` bytes at `offset` of the file at `path` into `out`, hashing each slab: their CRC32C.

  `stopped` is asked before each slab: once it says yes (the Orbax call the
  read belongs to failed, or ended), the read stops with `_drain.ReadAbandoned`.
  """
  if stopped():  # queued behind reads of a call that has failed since: not even the readahead hint
    raise _drain.ReadAbandoned(f"kckpt: {path}: not read, another read of the same call failed")
  view = out.reshape(-1).view(np.uint8)
  crc, done = 0, 0
  fd = os.open(path, os.O_RDONLY)
  try:
    if _NOWAIT:
      _read_ahead_unless_cached(fd, offset, view)
    while done < view.nbytes:
      if done and stopped():
        raise _drain.ReadAbandoned(f"kckpt: {path}: read stopped, another read of the same call failed")
      slab = view[done : done + SLAB_BYTES]
      n = os.preadv(fd, [slab.data], offset + done)
      if n <= 0:
        raise OSError(f"{path}: ends at {offset + done} bytes, {view.nbytes - done} more expected")
      crc = crc32c_of(slab[:n], crc)
      done += n
  finally:
    os.close(fd)
  return crc


async def read_saved_shard(label: str, region: Box, saved: int, dtype: np.dtype) -> np.ndarray | None:
  """The saved shard `region` of the array `label` ("<step folder>/<item>/<name>"), read and checked; None if not taken.

  None means: not stored in a way this path reads, or bytes that are not the
  ones saved (the caller reads the shard through TensorStore, and its check
  says what is wrong).
  """
  item_dir, _, name = label.rpartition("/")
  shape = tuple(hi - lo for lo, hi in region)
  if (
    not _available
    or not shape
    or math.prod(shape) * dtype.itemsize <= INLINE_VALUE_BYTES  # stored inside the index: TensorStore reads it
    or "://" in item_dir
    or item_dir.rpartition("/")[0] not in _open_steps
  ):
    return None
  loading = _index_of(item_dir)
  # Shielded: a cancelled waiter must not cancel the load the other shards of the item wait for.
  item = loading.result() if loading.done() else await asyncio.shield(asyncio.wrap_future(loading))
  if _drain.abandoned():  # another read of this Orbax call failed while this one waited: start no read
    raise _drain.ReadAbandoned("kckpt: not read, another read of the same call failed")
  chunking = _chunking(item, name) if item is not None else None
  if item is None or chunking is None:
    return None
  chunks, separator = chunking
  if shape != chunks or any(lo % c for (lo, _), c in zip(region, chunks, strict=True)):
    return None
  key = f"{name}/{separator.join(str(lo // c) for (lo, _), c in zip(region, chunks, strict=True))}".encode()
  where = item.indirect.get(key)
  if where is None or where.length != math.prod(shape) * dtype.itemsize:
    return None
  out = _buffer(shape, dtype)
  loop = asyncio.get_running_loop()
  stopped = functools.partial(_drain.abandoned_loop, loop)  # a queued or running read stops when its call fails
  try:
    crc = await loop.run_in_executor(_worker(), _read, where.path, where.offset, out, stopped)
  except OSError as e:
    _log.debug("kckpt: direct read of %s failed, reading it through TensorStore: %s", label, e)
    return None
  return out if crc == saved else None
