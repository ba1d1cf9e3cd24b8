"""Restores read into 64-byte-aligned host buffers, which JAX's CPU client adopts without a copy.

Orbax 0.12 reads each array shard into ``np.zeros(shape)`` and hands it to
``jax.device_put`` (`serialization._read_shard`, then
`_read_array_index_and_device_put`). NumPy aligns its buffers to 16 bytes;
JAX's CPU client aliases a NumPy array only when it is 64-byte aligned, so
every restored array was copied once more, into fresh pages (measured: about
40% of restoring large arrays on the CPU, and a second copy of each array in
memory until the first is freed). While a kckpt restore runs, the shard is
read into an aligned buffer instead, and ``device_put`` keeps that buffer as
the array's own: one copy fewer, and less memory. The values are the same
bytes; on accelerators ``device_put`` copies to the device as before.

Only a shard that the read fills entirely gets an aligned buffer (no padding
of a larger target, no cast to another dtype); any other read goes to
Orbax's own function. Nothing changes until `reading()` is entered, and
reads of plain Orbax outside a kckpt restore are left as Orbax does them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorstore as ts
from orbax.checkpoint._src.serialization import serialization as _serialization  # Orbax 0.12 internal: see install

ALIGNMENT = 64  # bytes: what JAX's CPU client needs to alias a host buffer

_lock = threading.Lock()
_active = 0  # kckpt restores running now
_original_read_shard = _serialization._read_shard  # pylint: disable=protected-access
_installed = False


def aligned_empty(shape: tuple[int, ...], dtype: Any, alignment: int = ALIGNMENT) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts at a multiple of `alignment` bytes.

  >>> a = aligned_empty((3, 5), np.float32)
  >>> a.ctypes.data % ALIGNMENT, a.shape, a.flags.c_contiguous
  (0, (3, 5), True)
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  start = (-raw.ctypes.data) % alignment
  return raw[start : start + nbytes].view(dtype).reshape(shape)


async def _read_shard(t, *, new_shard_shape, dtype, requested_domain, restricted_domain):
  stored = t.dtype.numpy_dtype
  if not _active or requested_domain != restricted_domain or (dtype is not None and np.dtype(dtype) != stored):
    return await _original_read_shard(
      t,
      new_shard_shape=new_shard_shape,
      dtype=dtype,
      requested_domain=requested_domain,
      restricted_domain=restricted_domain,
    )
  out = aligned_empty(tuple(new_shard_shape), stored)
  # As Orbax does, into a buffer the read fills entirely (the domains are equal), so it needs no zeros.
  await ts.array(out)[ts.d[:].translate_to[requested_domain.origin]][restricted_domain].write(t[restricted_domain])
  return out


def install() -> None:
  """Hooks Orbax's shard reader (once; it changes nothing outside `reading()`)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internal: `_read_array_index_and_device_put` looks `_read_shard` up on its module.
      _serialization._read_shard = _read_shard  # pylint: disable=protected-access
      _installed = True


def installed() -> bool:
  return _installed and _serialization._read_shard is _read_shard  # pylint: disable=protected-access


@contextlib.contextmanager
def reading() -> Iterator[None]:
  """Shards read by Orbax while inside go to aligned buffers (see the module's docstring)."""
  global _active
  install()
  with _lock:
    _active += 1
  try:
    yield
  finally:
    with _lock:
      _active -= 1
