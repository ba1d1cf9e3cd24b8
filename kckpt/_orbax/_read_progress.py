"""The progress of a restore into a target, shard by shard, from Orbax's shard reader (and its bytes in flight).

Orbax 0.12 reads a whole tree in one call and reports nothing until it
returns. Its module-level `serialization._read_shard` reads each array shard
into host memory; it is wrapped (once, at the first kckpt restore, or the
first checked read: `check_reads_with`, see `_read_checks`) so that,
while a kckpt restore is `reporting`, the bytes of each shard read go to that
restore's progress bar. Reads outside a kckpt restore, and every value read,
are exactly Orbax's. When two kckpt restores run at once in one process, no
bar gets bytes (none could tell whose they are); each still completes at the
end. The same wrapper makes each shard wait its turn within the restore's
bound on the bytes read at once (`_inflight`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorstore as ts
from orbax.checkpoint._src.serialization import serialization as _serialization  # Orbax 0.12 internal: see install

from kckpt._orbax import _drain, _inflight

_lock = threading.Lock()
_listeners: list[Callable[[int], None]] = []  # one per kckpt restore reporting now
_installed = False
# Reads one shard given Orbax's reader: kckpt's checked read (`_read_checks.read_shard`) once installed.
_checked_read: Callable[..., Any] | None = None


def check_reads_with(read: Callable[..., Any]) -> None:
  """Every shard is read by `read(orbax_read_shard, t, **kwargs)` from now on (kckpt's checksum check)."""
  global _checked_read
  _checked_read = read
  install()


def casts(dtype: Any, read: np.ndarray) -> bool:
  """Whether Orbax's cast of a shard `read` to `dtype` makes a new array (not the identity)."""
  return dtype is not None and read.dtype != np.dtype(dtype)


async def read_shard(t, *, new_shard_shape, dtype, requested_domain, restricted_domain) -> np.ndarray:
  """Orbax 0.12's `_read_shard` (the same read and the same values), without its thread hop when nothing is cast.

  Orbax casts every shard read into a target to the target's dtype in a
  worker thread, the target's dtype being the saved one too;
  ``astype(dtype, copy=False)`` then returns the array itself, and the hop
  alone cost a restore of 9001 small leaves about 9% of its time.
  """
  out = np.zeros(new_shard_shape, dtype=t.dtype.numpy_dtype)
  await ts.array(out)[ts.d[:].translate_to[requested_domain.origin]][restricted_domain].write(t[restricted_domain])
  if casts(dtype, out):
    out = await asyncio.to_thread(out.astype, dtype, copy=False)
  return out


def _refuse_if_abandoned() -> None:
  if _drain.abandoned():  # another read of this Orbax call failed: its error is the one raised
    raise _drain.ReadAbandoned("kckpt: not read, another read of the same call failed")


def _itemsize(stored: np.dtype, dtype: Any) -> int:
  """The bytes per element of a shard read as stored and cast to `dtype` (both are alive while it is cast)."""
  try:
    return max(stored.itemsize, np.dtype(dtype).itemsize) if dtype is not None else stored.itemsize
  except TypeError:  # an extended dtype (PRNG keys): what is stored
    return stored.itemsize


async def _read_shard(t, *, new_shard_shape, dtype, requested_domain, restricted_domain):
  read = read_shard if _checked_read is None else functools.partial(_checked_read, read_shard)
  kwargs = {
    "new_shard_shape": new_shard_shape,
    "dtype": dtype,
    "requested_domain": requested_domain,
    "restricted_domain": restricted_domain,
  }
  limit = _inflight.current()
  if limit is None:
    _refuse_if_abandoned()
    out = await read(t, **kwargs)
  else:
    # The bytes stay counted until Orbax has placed the shard: it calls `device_put` right after this returns,
    # with no await between, so no other read starts before.
    async with limit.admitted(math.prod(new_shard_shape) * _itemsize(t.dtype.numpy_dtype, dtype)):
      _refuse_if_abandoned()
      out = await read(t, **kwargs)
  listeners = tuple(_listeners)
  if len(listeners) == 1:
    try:
      listeners[0](int(out.nbytes))
    except Exception:  # pylint: disable=broad-exception-caught  # a progress bar must never fail a restore
      logging.getLogger("kckpt").exception("kckpt: reporting the progress of a restore failed")
  return out


def install() -> None:
  """Wraps Orbax's shard reader (once; it reports nothing outside `reporting`)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internal: `_read_array_index_and_device_put` looks `_read_shard` up on its module.
      _serialization._read_shard = _read_shard  # pylint: disable=protected-access
      _installed = True


def installed() -> bool:
  return _installed and _serialization._read_shard is _read_shard  # pylint: disable=protected-access


@contextlib.contextmanager
def reporting(on_bytes: Callable[[int], None] | None) -> Iterator[None]:
  """While inside, `on_bytes(n)` is called with the bytes of each shard Orbax reads (None: nothing to report)."""
  if on_bytes is None:
    yield
    return
  install()
  with _lock:
    _listeners.append(on_bytes)
  try:
    yield
  finally:
    with _lock:
      _listeners.remove(on_bytes)
