"""Moving a process's packed shards to peer processes and back, with JAX's own collectives.

A `ppermute` over a mesh of one device per process (gloo on CPU, NCCL or ICI
on accelerators), a chunk of `CHUNK_BYTES` at a time. Small values (sizes,
errors, host names) go through JAX's coordination service
(`kckpt.multihost.exchange`).

Collectives are issued only from the caller's thread, in the same order on
every process, so that they interleave with the training step's own
collectives in the same order everywhere: issued from a background thread they
could be enqueued in another order on each process and deadlock (on
accelerators one stream per device runs them in the order they came). The
caller only *dispatches* a chunk (JAX dispatches asynchronously); another
thread waits for it and copies it to host memory. `PeerCopy` is one such
copy, spread over the training loop's `maybe_save` calls; `shift` is one run
to its end at once (for a restore).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kckpt import multihost
from kckpt.errors import ProcessTimeoutError

log = logging.getLogger("kckpt")

CHUNK_BYTES = 64 * 2**20
_WIDTH_STEP = 64 * 2**10
# Chunks dispatched and not yet copied to host memory, at most (each holds its input and output on a device).
IN_FLIGHT = 4


class PeerTransferError(RuntimeError):
  """Moving shards between processes failed (on this or another process: the message says which)."""


def _exchange(name: str, value: Any, timeout_secs: float) -> dict[int, Any]:
  return multihost.exchange(name, value, timeout_secs=timeout_secs, what="a local-tier copy between processes")


def shifts(replicas: int, *, timeout_secs: float) -> list[int]:
  """How far (in process index, mod the process count) each of the `replicas` copies goes.

  The first is the smallest shift that sends every process's copy to another
  host (by host name), when the job has several hosts; then its multiples,
  then the other shifts. With one process: none.
  """
  n = multihost.process_count()
  if replicas < 1 or n == 1:
    return []
  hosts = _exchange("local_tier_hosts", socket.gethostname(), timeout_secs)
  base = next((k for k in range(1, n) if all(hosts[(p + k) % n] != hosts[p] for p in range(n))), None)
  if base is None:
    base = 1
    if len(set(hosts.values())) > 1:
      log.warning("kckpt: no single shift of the %d processes puts every local-tier copy on another host: some share one", n)
  order = [base * j % n for j in range(1, n)] + list(range(1, n))
  chosen: list[int] = []
  for k in order:
    if k and k not in chosen:
      chosen.append(k)
  return chosen[: min(replicas, n - 1)]


class PeerCopy:
  """This process's buffer on its way to the processes `shifts` ahead, and theirs on the way here.

  Every process makes one at the same call, with the same `shifts` and
  `sizes` (every process's buffer size). The chunks are then dispatched, in
  the same order everywhere, by `advance` and `finish` on the caller's thread;
  `collect`, on another thread, waits for each and copies it into the buffers
  received. A chunk that cannot be placed on this process is sent as zeros
  with a flag that says so (the collective still matches the others'), so
  that `collect` raises on this process and on the one receiving it.

      copy = PeerCopy(buffer, [1], sizes, timeout_secs=600)
      copy.advance(IN_FLIGHT)            # caller: returns at once
      ... thread: received = copy.collect()
      copy.finish()                      # caller, later: the rest, in bounded memory
  """

  def __init__(self, buffer: np.ndarray, shifts_: Sequence[int], sizes: Mapping[int, int], *, timeout_secs: float):
    self._n, self._me = multihost.process_count(), multihost.process_index()
    n, me = self._n, self._me
    longest = max(sizes.values(), default=0)
    self._buffer = buffer
    self._timeout_secs = timeout_secs
    # (shift, offset, width): chunks of CHUNK_BYTES, the last one only as wide as what is left (rounded up, so
    # that a buffer a few bytes longer than the last save's compiles no new program, and padding stays small).
    self._plan = [
      (by, at, min(CHUNK_BYTES, -(-(max(longest, 1) - at) // _WIDTH_STEP) * _WIDTH_STEP))
      for by in shifts_
      for at in range(0, max(longest, 1), CHUNK_BYTES)
    ]
    self.received = {(me - by) % n: np.empty(sizes[(me - by) % n], dtype=np.uint8) for by in shifts_}
    self._devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
    mesh = jax.sharding.Mesh(np.array(self._devices), ("p",))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
    self._permutes = {by: _permute(mesh, tuple((i, (i + by) % n) for i in range(n))) for by in shifts_}
    self._results: list[Any] = []  # by chunk: the dispatched (data, flag), None once collected
    self._collected = 0
    self._collector_stopped = False  # `collect` ended (or will never run here: `abandon`)
    self._cancelled = False  # the caller gave up: `collect` stops, `committing` refuses
    self._cond = threading.Condition()
    self._commit_lock = threading.Lock()
    self._errors: list[str] = []

  @property
  def chunks(self) -> int:
    return len(self._plan)

  @property
  def dispatched(self) -> int:
    return len(self._results)

  @property
  def collected(self) -> int:
    """Chunks copied into host memory here (the progress each process reports at `maybe_save`)."""
    return self._collected

  @property
  def errors(self) -> list[str]:
    return list(self._errors)

  def advance(self, upto: int) -> None:
    """Caller's thread: dispatches the chunks before `upto`; does not wait for their transfer.

    Every process must pass the same `upto` at the same call, at most
    `IN_FLIGHT` past the fewest chunks any process has collected.
    """
    while self.dispatched < min(upto, self.chunks):
      self._dispatch()

  def finish(self) -> None:
    """Caller's thread: dispatches every chunk left and waits until every chunk was collected here.

    A chunk is dispatched once this process holds fewer than `IN_FLIGHT`.
    Raises `ProcessTimeoutError` when no chunk arrived (or, with no collector
    here, no chunk finished moving) for `timeout_secs`: a peer died or is
    stuck, or stopped dispatching.
    """
    while self.dispatched < self.chunks:
      j = self.dispatched
      # (Only this thread dispatches: `self.dispatched` stays j while it waits.)
      orphan = self._wait_until(lambda: self._collected > self.dispatched - IN_FLIGHT or self._collector_stopped)
      out = self._dispatch()
      if orphan:  # no one collects here any more: the chunk still moves (the peers wait for it), then goes
        deadline = time.monotonic() + self._timeout_secs
        while not all(a.is_ready() for a in out):
          if time.monotonic() > deadline:
            raise self._timed_out()
          time.sleep(0.01)  # JAX has no wait with a timeout
        with self._cond:
          self._results[j] = None
    self._wait_until(lambda: self._collected == self.chunks or self._collector_stopped)

  def _wait_until(self, done: Callable[[], bool]) -> bool:
    """Waits (under the lock) until `done()`, raising if the chunks collected do not move for `timeout_secs`."""
    with self._cond:
      seen, deadline = self._collected, time.monotonic() + self._timeout_secs
      while not done():
        if self._collected != seen:
          seen, deadline = self._collected, time.monotonic() + self._timeout_secs
        left = deadline - time.monotonic()
        if left <= 0:
          raise self._timed_out()
        self._cond.wait(timeout=min(left, 5.0))
      return self._collector_stopped

  def _timed_out(self) -> ProcessTimeoutError:
    return ProcessTimeoutError(
      f"process {self._me}: no chunk of the local tier's copy between processes moved for {self._timeout_secs:g} s "
      f"({self._collected} of {self.chunks} received here; Checkpointer.barrier_timeout_secs). A process died or is "
      "stuck, and the processes' collectives may no longer match: the run cannot go on. Exit this process "
      "(os._exit: JAX's shutdown would wait for the missing ones) and restart the job."
    )

  def abandon(self) -> None:
    """No `collect` will run here (the background work failed first): `finish` moves the rest without waiting for it."""
    with self._cond:
      self._collector_stopped = True
      self._cond.notify_all()

  def cancel(self) -> None:
    """The caller gave up on this copy: `collect` raises instead of going on, and `committing` refuses.

    Waits for a commit under way (`committing`) to end: once it returns, the
    step of this copy is either committed already or never will be.
    """
    with self._commit_lock, self._cond:
      self._cancelled = True
      self._cond.notify_all()

  @contextlib.contextmanager
  def committing(self) -> Iterator[None]:
    """Held while the step of this copy is committed; raises `PeerTransferError` once the copy was cancelled."""
    with self._commit_lock:
      if self._cancelled:
        raise PeerTransferError(f"process {self._me}: the copy between processes was given up; the step is not committed")
      yield

  def _dispatch(self) -> Any:
    j = self.dispatched
    by, at, width = self._plan[j]
    device = self._devices[self._me]
    try:
      chunk = self._buffer[at : at + width]
      if chunk.size < width:
        padded = np.zeros(width, np.uint8)
        padded[: chunk.size] = chunk
        chunk = padded
      mine, ok = jax.device_put(chunk.reshape(1, width), device), 1
    except Exception as e:  # pylint: disable=broad-exception-caught  # zeros keep the peers going; the flag tells
      self._errors.append(f"process {self._me}: chunk {j} could not be placed: {type(e).__name__}: {e}")
      mine, ok = jax.device_put(np.zeros((1, width), np.uint8), device), 0
    flag = jax.device_put(np.full((1, 1), ok, np.int32), device)
    glob = jax.make_array_from_single_device_arrays((self._n, width), self._sharding, [mine])
    flags = jax.make_array_from_single_device_arrays((self._n, 1), self._sharding, [flag])
    out = self._permutes[by](glob, flags)
    with self._cond:
      self._results.append(out)
      self._cond.notify_all()
    return out

  def collect(self) -> dict[int, np.ndarray]:
    """Another thread: waits for each chunk in turn; returns ``{process: its buffer}`` of the processes sending here.

    Raises `PeerTransferError` when a chunk could not be placed here or by
    the process sending it, or when the caller cancelled the copy.
    """
    try:
      for j, (by, at, width) in enumerate(self._plan):
        with self._cond:
          while self.dispatched <= j and not self._cancelled:
            self._cond.wait()
          if self._cancelled:
            raise PeerTransferError(f"process {self._me}: the copy between processes was given up at chunk {j} of {self.chunks}")
          out = self._results[j]
        self._take(j, by, at, width, out)
        out = None  # not held while waiting for the next dispatch
    finally:
      with self._cond:
        self._collector_stopped = True
        self._cond.notify_all()
    if self._errors:
      raise PeerTransferError("; ".join(self._errors))
    return self.received

  def _take(self, j: int, by: int, at: int, width: int, out: Any) -> None:
    data, flag = out
    source = (self._me - by) % self._n
    moved = np.asarray(data.addressable_shards[0].data)[0]
    if not int(np.asarray(flag.addressable_shards[0].data)[0, 0]):
      self._errors.append(f"process {self._me}: process {source} sent zeros for chunk {j} (it could not place it)")
    received = self.received[source]
    take = max(0, min(width, received.size - at))
    received[at : at + take] = moved[:take]
    with self._cond:
      self._results[j] = None
      self._collected = j + 1
      self._cond.notify_all()

  def run(self) -> dict[int, np.ndarray]:
    """Caller's thread: the whole copy now (dispatching ahead of the copies to host), for a restore."""
    for j in range(self.chunks):
      self._dispatch()
      if (k := j - IN_FLIGHT + 1) >= 0:
        self._take(k, *self._plan[k], self._results[k])
    for k in range(max(0, self.chunks - IN_FLIGHT + 1), self.chunks):
      self._take(k, *self._plan[k], self._results[k])
    return self.received


def shift(buffer: np.ndarray, by: int, *, timeout_secs: float) -> np.ndarray:
  """Sends `buffer` (uint8) to process ``(me + by) % n``; returns the buffer of process ``(me - by) % n``.

  A process with nothing to send passes an empty buffer. Raises
  `PeerTransferError` on every process when any fails to place a chunk.
  """
  n, me = multihost.process_count(), multihost.process_index()
  sizes = _exchange("local_tier_size", int(buffer.size), timeout_secs)
  copy = PeerCopy(buffer, [by], sizes, timeout_secs=timeout_secs)
  received = copy.run()[(me - by) % n]
  errors = _exchange("local_tier_chunk", "; ".join(copy.errors) or None, timeout_secs)
  if errors:
    raise PeerTransferError("; ".join(errors[p] for p in sorted(errors)))
  return received


_PERMUTES: dict[Any, Any] = {}
_NOT_INLINE = 4096  # elements summed beside each chunk's ppermute (see `_permute`)


def _shard_map() -> Any:
  if hasattr(jax, "shard_map"):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top  # older JAX

  return shard_map


def _permute(mesh: jax.sharding.Mesh, perm: tuple[tuple[int, int], ...]) -> Any:
  """The jitted `ppermute` by `perm` of a ``(processes, width)`` uint8 array and a ``(processes, 1)`` flag over `mesh`."""
  key = (tuple(d.id for d in mesh.devices.flat), perm)
  if key not in _PERMUTES:
    spec = jax.sharding.PartitionSpec("p")

    def body(x: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
      # The sum is there for XLA's CPU client only: it runs a program of under 1000 flops in the calling
      # thread when its inputs are ready, so a bare ppermute would block the caller for the whole transfer.
      moved = jax.lax.ppermute((x, ok), "p", perm=list(perm))
      return moved[0], moved[1], jnp.sum(x[:, :_NOT_INLINE].astype(jnp.int32), axis=1)

    program = jax.jit(_shard_map()(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec, spec)))
    _PERMUTES[key] = lambda x, ok: program(x, ok)[:2]
  return _PERMUTES[key]
