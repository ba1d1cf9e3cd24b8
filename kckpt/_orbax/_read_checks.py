"""Checking what kckpt reads against the CRC32C of each saved shard (steps saved with `CRC32C_SHARDS`).

A read of a step opens a scope (`checking(step folder)`) that loads the
step's `CHECKSUMS_FILE` once. While it is open, three Orbax functions, wrapped
once at the first scope (see `_reaches`), check every array of that step:

- ``tensorstore_utils.build_array_read_spec`` (called per array by Orbax's
  array and NumPy handlers) ties the read spec it builds to the array's
  recorded shards;
- ``serialization.async_deserialize`` (a `jax.Array` target) makes them the
  current array's (a context variable, which Orbax's per-shard tasks inherit),
  and kckpt's wrapper of ``serialization._read_shard`` (`read_shard`) checks
  each shard it reads: when the shard is a saved one (a restore onto the
  saved sharding, or one process), it is read straight from its data file
  and hashed as it is read (`_direct_reads`, the default format), or read by
  Orbax and then hashed once; else each saved shard it touches is read whole
  and checked first (a resharded restore reads those bytes twice);
- ``type_handlers.NumpyHandler.deserialize`` (no target: arrays as saved)
  checks each recorded shard of the whole array it returns.

A mismatch raises `ChecksumMismatch` (a ``ValueError``: a read error, which
kckpt's readers report as a damaged step naming the item and leaf). Reads
outside a scope, and arrays without a recorded checksum (scalars, steps saved
without checksums), are Orbax's own, unchanged. The CRC32C runs on the CPU's
CRC instruction without the GIL (`_checksums.crc32c_of`), on kckpt's one
background thread (`_background`) for shards over `INLINE_BYTES`. A shard
is checked before Orbax gets it, so a mismatch fails the read, and while it
is checked it is still counted by the restore's bounds on the bytes read at
once (Orbax's `restore_concurrent_gb`, kckpt's `_inflight`): checking a
shard read as saved holds no buffer outside them. (A resharded or cast read
checks each saved shard it touches by reading it whole, in slabs of up to
`SLAB_BYTES`, outside those bounds; a read without a target checks the
arrays NumPy returns.) Other shards are read meanwhile. Shards read by
Orbax are hashed on one thread, at 10-14 GB/s from memory on the machine
this was measured on; shards read directly are hashed slab by slab on the
threads that read them (`_direct_reads.READ_THREADS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.serialization import serialization as _serialization  # Orbax 0.12 internal: see install
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see install
from orbax.checkpoint._src.serialization import type_handlers as _type_handlers  # Orbax 0.12 internal: see install

from kckpt import _gc
from kckpt._orbax import _background, _direct_reads, _format, _read_progress
from kckpt._orbax._checksums import Box
from kckpt._orbax._checksums import crc32c_of

# Shards up to this size are hashed on the event loop's thread (a thread hop costs more), still without the
# GIL: holding it through the hash of each small shard made cold restores of 3001 leaves 8% slower, and
# releasing it 1% (20 and 14 paired rounds; likely: TensorStore hands each finished read back through the GIL).
INLINE_BYTES = 1 << 20
SLAB_BYTES = 64 << 20  # a saved shard read whole to be checked is read (and hashed) in pieces of about this size


class ChecksumMismatch(ValueError):
  """The bytes read of a saved shard are not those saved: their CRC32C differs from the one recorded at save."""


@dataclasses.dataclass(slots=True)
class _Expected:
  """The recorded shards of one array, and how to reach its stored bytes (not changed once made)."""

  label: str  # "<step folder>/<item>/<parameter name>", for errors
  dtype: str  # as stored (and checksummed)
  by_box: dict[Box, int]  # each recorded shard's CRC32C
  base_spec: dict[str, Any] | None = None  # a read cast to another dtype: the stored array's spec (its bytes are checked)
  context: Any = None  # the TensorStore context of the read (OCDBT caches)

  @property
  def sums(self) -> Iterator[tuple[Box, int]]:
    return iter(self.by_box.items())


def _parse(step_dir: epath.Path, table: Any) -> dict[tuple[str, str], _Expected]:
  """(item, parameter name) -> its recorded shards; a malformed file is a damaged step (`ValueError`).

  Run once per restore over every leaf (9001 leaves: about 15 ms).
  """
  key = _key(step_dir)
  out: dict[tuple[str, str], _Expected] = {}
  try:
    for item, leaves in table.items():
      prefix = f"{key}/{item}/"
      for name, leaf in leaves.items():
        dtype, ndim = leaf["dtype"], len(leaf["shape"])
        by_box: dict[Box, int] = {}
        for box, crc in leaf["shards"]:
          box = tuple(map(tuple, box))
          # A bool, float or string where an int belongs is a damaged file.
          if len(box) != ndim or type(crc) is not int or not all(len(b) == 2 and type(b[0]) is type(b[1]) is int for b in box):
            raise ValueError(f"leaf {name}: shard {box!r}, CRC32C {crc!r}, shape {leaf['shape']!r}")
          by_box[box] = crc
        if not isinstance(dtype, str):
          raise ValueError(f"leaf {name}: dtype {dtype!r}")
        out[(str(item), str(name))] = _Expected(prefix + str(name), dtype, by_box)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f"DATA_LOSS: {_format.CHECKSUMS_FILE} of the step at {step_dir} is malformed: {type(e).__name__}: {e}"
    ) from None
  return out


_lock = threading.Lock()
_scopes: dict[str, tuple[int, dict[tuple[str, str], _Expected]]] = {}  # step folder -> (open scopes, its leaves)
_read_owners: dict[int, tuple[dict[str, Any], _Expected]] = {}  # id(read spec) -> (the spec, its array's shards)
# (label, box) -> the task checking that saved shard, read whole (a resharded read): once per scope, not per reader.
_whole_checks: dict[tuple[str, Box], asyncio.Task] = {}


# The recorded shards of the array being read. Orbax gathers each array's read as a task of its own, so the
# value set by its `async_deserialize` reaches that array's shard reads and no other array's.
_current: contextvars.ContextVar[_Expected | None] = contextvars.ContextVar("kckpt_array_checksums", default=None)
_last_parent: tuple[Any, str, str] = (None, "", "")  # the last item folder looked up, its step and item names
_original_build = _ts_utils.build_array_read_spec
_original_deserialize = _serialization.async_deserialize
_original_numpy_deserialize = _type_handlers.NumpyHandler.deserialize
_installed = False


def _key(path: Any) -> str:
  return epath.Path(path).as_posix().rstrip("/")


@contextlib.contextmanager
def checking(step_dir: epath.Path) -> Iterator[None]:
  """While inside, arrays read from the step at `step_dir` are checked against its recorded checksums.

  A step saved without `CRC32C_SHARDS` (plain Orbax, earlier development
  versions, checksums off) is read as it is. A step that says it has them
  but lost or garbled its checksum file raises a `ValueError` (a damaged
  step) on entry, before anything is read. Scopes nest: an inner scope of
  a step already open reuses its table (one parse per restore).
  """
  key = _key(step_dir)
  table: dict[tuple[str, str], _Expected] | None
  with _lock:
    if key in _scopes:
      count, table = _scopes[key]
      _scopes[key] = (count + 1, table)
      table = None
    else:
      table = {}
  if table is not None:  # the first scope of this step: load its table
    with _gc.paused():  # ~10 objects per leaf: full collections of the caller's heap, 10x the parse
      table = _load(step_dir)
    if table is None:  # saved without checksums
      yield
      return
    install()
    with _lock:
      count, known = _scopes.get(key, (0, table))
      _scopes[key] = (count + 1, known)
  try:
    with _direct_reads.scope(key):
      yield
  finally:
    with _lock:
      count, table = _scopes[key]
      if count == 1:
        del _scopes[key]
        for check in [c for c in _whole_checks if c[0].startswith(f"{key}/")]:
          del _whole_checks[check]
      else:
        _scopes[key] = (count - 1, table)
    forget_unread(step_dir)


def _load(step_dir: epath.Path) -> dict[tuple[str, str], _Expected] | None:
  """The step's recorded shards by (item, leaf); None for a step saved without checksums."""
  if _format.step_checksums(_format.read_step_metadata(step_dir)) != _format.CRC32C_SHARDS:
    return None
  try:
    raw = _format.read_step_checksums(step_dir)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"DATA_LOSS: {_format.CHECKSUMS_FILE} of the step at {step_dir} is not JSON: {e}") from None
  if raw is None:
    raise ValueError(f"DATA_LOSS: the step at {step_dir} was saved with checksums but {_format.CHECKSUMS_FILE} is missing")
  return _parse(step_dir, raw)


def forget_unread(step_dir: epath.Path) -> None:
  """Drops the read specs built for arrays of `step_dir` that were not read as `jax.Array`s (NumPy reads, metadata).

  Called after each Orbax call of a scope, so that a restore in many calls holds one call's specs at most.
  """
  prefix = f"{_key(step_dir)}/"
  with _lock:
    for spec_id, (_, expected) in list(_read_owners.items()):
      if expected.label.startswith(prefix):
        del _read_owners[spec_id]


def _expected_for(info: Any, spec: dict[str, Any] | None = None) -> _Expected | None:
  """The recorded shards of the array `info` names, when a scope of its step is open.

  Called for every array read (thousands per restore): string operations on
  the item folder, no path objects.
  """
  # Orbax's `ParamInfo.parent_dir` property checks its value against a runtime Protocol: tens of µs per call.
  parent = getattr(info, "_parent_dir", None)
  if not isinstance(parent, (str, os.PathLike)):  # not a folder (yet): Orbax's property says why
    parent = getattr(info, "parent_dir", None)
  if not _scopes or parent is None or info.name is None:
    return None
  global _last_parent
  last = _last_parent
  if last[0] is parent:  # Orbax gives every array of an item the same folder object
    _, step, item = last
  else:
    step, _, item = str(parent).rstrip("/").rpartition("/")
    _last_parent = (parent, step, item)  # one tuple: other threads see the old one or this one
  found = _scopes.get(step)
  if found is None:
    return None
  expected = found[1].get((item, str(info.name)))
  if expected is None:
    return None
  # Orbax casts every read with a target dtype, to the same dtype too: only another dtype reads other bytes.
  if spec is None or spec.get("driver") != "cast" or spec.get("dtype") == expected.dtype:
    return expected
  return dataclasses.replace(expected, base_spec=spec["base"], context=getattr(info, "ts_context", None))


def _mismatch(expected: _Expected, box: Box, saved: int, read: int) -> ChecksumMismatch:
  step, item, name = expected.label.rsplit("/", 2)
  return ChecksumMismatch(
    f"checksum mismatch, the data changed after it was saved: leaf {name} of item {item} of {step}, shard"
    f" {[list(b) for b in box]}: CRC32C saved {saved:#010x}, read {read:#010x}"
  )


def _check(expected: _Expected, box: Box, saved: int, data: np.ndarray) -> None:
  read = crc32c_of(data)  # without the GIL, on any thread (see `INLINE_BYTES`)
  if read != saved:
    raise _mismatch(expected, box, saved, read)


async def _check_async(expected: _Expected, box: Box, saved: int, data: np.ndarray) -> None:
  if data.nbytes > INLINE_BYTES:
    await _background.run(_check, expected, box, saved, data)
  else:  # on the event loop's thread: a few microseconds
    _check(expected, box, saved, data)


def _overlaps(a: Box, b: Box) -> bool:
  return all(lo < other_hi and other_lo < hi for (lo, hi), (other_lo, other_hi) in zip(a, b, strict=True))


async def _check_whole(expected: _Expected, store: ts.TensorStore, box: Box, saved: int) -> None:
  """Reads one saved shard from `store` in slabs of about `SLAB_BYTES` along its first axis, and checks it."""
  if not box:
    await _check_async(expected, box, saved, np.asarray(await store[()].read()))
    return
  row_bytes = store.dtype.numpy_dtype.itemsize * int(np.prod([hi - lo for lo, hi in box[1:]], dtype=np.int64))
  rows = max(1, SLAB_BYTES // max(1, row_bytes))
  rest = tuple(slice(lo, hi) for lo, hi in box[1:])
  crc = 0
  for start in range(box[0][0], box[0][1], rows):
    slab = np.asarray(await store[(slice(start, min(start + rows, box[0][1])), *rest)].read())
    crc = await _background.run(crc32c_of, slab, crc) if slab.nbytes > INLINE_BYTES else crc32c_of(slab, crc)
  if crc != saved:
    raise _mismatch(expected, box, saved, crc)


async def _check_saved_shards(expected: _Expected, store: ts.TensorStore | None, region: Box | None) -> None:
  """Checks each recorded shard touching `region` (None: all), read whole from the stored array, once per scope.

  Several readers of one saved shard (a resharded restore: each target
  shard touches it) wait for one check.
  """
  if expected.base_spec is not None or store is None:
    if expected.base_spec is None:
      raise ValueError(f"kckpt: no stored array to check {expected.label} against")
    context = {"context": expected.context} if expected.context is not None else {}
    store = await ts.open(expected.base_spec, open=True, **context)
  if region is not None:
    covered = sum(
      math.prod(min(hi, r_hi) - max(lo, r_lo) for (lo, hi), (r_lo, r_hi) in zip(box, region, strict=True))
      for box, _ in expected.sums
      if _overlaps(box, region)
    )
    if covered != math.prod(hi - lo for lo, hi in region):
      raise ChecksumMismatch(
        f"DATA_LOSS: the recorded checksums of {expected.label} do not cover the part read, {[list(b) for b in region]}"
      )
  loop = asyncio.get_running_loop()
  tasks = []
  for box, saved in expected.sums:
    if region is not None and not _overlaps(box, region):
      continue
    with _lock:
      task = _whole_checks.get((expected.label, box))
      if task is not None and task.done() and not task.cancelled() and task.exception() is None:
        continue  # checked already in this scope
      if task is None or task.done() or task.get_loop() is not loop:
        task = loop.create_task(_check_whole(expected, store, box, saved))
        _whole_checks[(expected.label, box)] = task
    tasks.append(task)
  await asyncio.gather(*tasks)


async def read_shard(original, t, *, new_shard_shape, dtype, requested_domain, restricted_domain) -> np.ndarray:
  """Orbax's `_read_shard`, checked against the current array's recorded shards (if any)."""
  expected = _current.get()
  kwargs = {
    "new_shard_shape": new_shard_shape,
    "dtype": dtype,
    "requested_domain": requested_domain,
    "restricted_domain": restricted_domain,
  }
  if expected is None:
    return await original(t, **kwargs)
  region: Box = tuple(zip(restricted_domain.inclusive_min, restricted_domain.exclusive_max, strict=True))
  saved = expected.by_box.get(region)
  if saved is None or expected.base_spec is not None:
    await _check_saved_shards(expected, t, region)
    return await original(t, **kwargs)
  # The shard read is a saved one. Stored as kckpt stores it by default, it is read from its data file and
  # hashed as it is read (`_direct_reads`); else (or if those bytes are not the ones saved) Orbax's read
  # (`_read_progress.read_shard`), then one CRC32C of its bytes. Either way it is checked before Orbax gets
  # the shard: until then it stays counted by the bounds on the bytes read at once.
  if tuple(new_shard_shape) == tuple(hi - lo for lo, hi in region):
    out = await _direct_reads.read_saved_shard(expected.label, region, saved, t.dtype.numpy_dtype)
    if out is not None:
      if _read_progress.casts(dtype, out):
        out = await asyncio.to_thread(out.astype, dtype, copy=False)
      return out
  out = np.zeros(new_shard_shape, dtype=t.dtype.numpy_dtype)
  await ts.array(out)[ts.d[:].translate_to[requested_domain.origin]][restricted_domain].write(t[restricted_domain])
  view = out
  if tuple(new_shard_shape) != tuple(hi - lo for lo, hi in region):  # a target larger than saved: the read part
    offset = [lo - origin for (lo, _), origin in zip(region, requested_domain.origin, strict=True)]
    view = out[tuple(slice(o, o + hi - lo) for o, (lo, hi) in zip(offset, region, strict=True))]
  await _check_async(expected, region, saved, view)
  if _read_progress.casts(dtype, out):
    out = await asyncio.to_thread(out.astype, dtype, copy=False)
  return out


def _build_array_read_spec(info, *args, **kwargs):
  spec = _original_build(info, *args, **kwargs)
  if _scopes:
    expected = _expected_for(info, spec.json)
    if expected is not None:
      with _lock:
        _read_owners[id(spec.json)] = (spec.json, expected)
  return spec


async def _async_deserialize(user_sharding, tensorstore_spec, *args, **kwargs):
  with _lock:
    owner = _read_owners.pop(id(tensorstore_spec), None) if _read_owners else None
  if owner is None or owner[0] is not tensorstore_spec:
    return await _original_deserialize(user_sharding, tensorstore_spec, *args, **kwargs)
  token = _current.set(owner[1])
  try:
    return await _original_deserialize(user_sharding, tensorstore_spec, *args, **kwargs)
  finally:
    try:
      _current.reset(token)
    except ValueError:  # a read abandoned unfinished is closed later, in another context
      pass


async def _numpy_deserialize(self, infos: Sequence[Any], args: Sequence[Any] | None = None):
  values = await _original_numpy_deserialize(self, infos, args)
  if not _scopes:
    return values
  checks = []
  for i, (info, value) in enumerate(zip(infos, values, strict=True)):
    expected = _expected_for(info)
    if expected is None or not isinstance(value, np.ndarray):
      continue
    dtype = getattr(args[i], "dtype", None) if args is not None else None
    if dtype is not None and np.dtype(dtype).name != expected.dtype:  # read cast to another dtype: check the stored bytes
      stored = _original_build(info, use_ocdbt=bool(info.is_ocdbt_checkpoint), metadata_key=getattr(self, "_metadata_key", None))
      checks.append(
        _check_saved_shards(dataclasses.replace(expected, base_spec=stored.json, context=info.ts_context), None, None)
      )
      continue
    for box, saved in expected.sums:
      checks.append(_check_async(expected, box, saved, value[tuple(slice(lo, hi) for lo, hi in box)]))
  await asyncio.gather(*checks)
  return values


def install() -> None:
  """Wraps Orbax's read spec builder, array deserializer and NumPy reader (once; no change outside `checking`)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internals: `ts_utils.build_array_read_spec` and `serialization.async_deserialize` are
      # looked up on their modules by jax_array_handlers and type_handlers; `NumpyHandler.deserialize`
      # on the class (ScalarHandler's `super()` call included).
      _ts_utils.build_array_read_spec = _build_array_read_spec
      _serialization.async_deserialize = _async_deserialize
      _type_handlers.NumpyHandler.deserialize = _numpy_deserialize  # type: ignore[method-assign]
      _installed = True
  _read_progress.check_reads_with(read_shard)


def installed() -> bool:
  return (
    _installed
    and _ts_utils.build_array_read_spec is _build_array_read_spec
    and _serialization.async_deserialize is _async_deserialize
    and _type_handlers.NumpyHandler.deserialize is _numpy_deserialize
  )
