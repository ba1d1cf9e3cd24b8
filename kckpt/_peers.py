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

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kckpt import multihost

log = logging.getLogger("kckpt")

CHUNK_BYTES = 64 * 2**20
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
  (the collective still matches the others') and its error is raised by
  `collect`.

      copy = PeerCopy(buffer, [1], sizes)
      copy.advance(IN_FLIGHT)            # caller: returns at once
      ... thread: received = copy.collect()
      copy.finish()                      # caller, later: the rest, in bounded memory
  """

  def __init__(self, buffer: np.ndarray, shifts_: Sequence[int], sizes: Mapping[int, int]):
    self._n, self._me = multihost.process_count(), multihost.process_index()
    n, me = self._n, self._me
    longest = max(sizes.values(), default=0)
    self._width = min(max(longest, 1), CHUNK_BYTES)
    self._buffer = buffer
    self._plan = [(by, at) for by in shifts_ for at in range(0, max(longest, 1), self._width)]
    self.received = {(me - by) % n: np.empty(sizes[(me - by) % n], dtype=np.uint8) for by in shifts_}
    self._devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
    mesh = jax.sharding.Mesh(np.array(self._devices), ("p",))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
    self._permutes = {by: _permute(mesh, tuple((i, (i + by) % n) for i in range(n))) for by in shifts_}
    self._results: list[Any] = []  # by chunk: the dispatched result, None once collected
    self._collected = 0
    self._collector_stopped = False
    self._cond = threading.Condition()
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

  def advance(self, upto: int) -> None:
    """Caller's thread: dispatches the chunks before `upto`; never waits for a transfer.

    Every process must pass the same `upto` at the same call, at most
    `IN_FLIGHT` past the fewest chunks any process has collected.
    """
    while self.dispatched < min(upto, self.chunks):
      self._dispatch()

  def finish(self) -> None:
    """Caller's thread: dispatches every chunk left, each once this process holds fewer than `IN_FLIGHT`."""
    while self.dispatched < self.chunks:
      j = self.dispatched
      with self._cond:
        while not (self._collected > j - IN_FLIGHT or self._collector_stopped):
          self._cond.wait()
        orphan = self._collector_stopped
      out = self._dispatch()
      if orphan:  # no one collects here any more: the chunk still moves (the peers wait for it), then goes
        out.block_until_ready()
        with self._cond:
          self._results[j] = None

  def _dispatch(self) -> Any:
    j = self.dispatched
    by, at = self._plan[j]
    width, device = self._width, self._devices[self._me]
    try:
      chunk = self._buffer[at : at + width]
      if chunk.size < width:
        chunk = np.concatenate([chunk, np.zeros(width - chunk.size, np.uint8)])
      mine = jax.device_put(chunk.reshape(1, width), device)
    except Exception as e:  # pylint: disable=broad-exception-caught  # raised by `collect`; zeros keep the peers going
      self._errors.append(f"process {self._me}: {type(e).__name__}: {e}")
      mine = jax.device_put(np.zeros((1, width), np.uint8), device)
    glob = jax.make_array_from_single_device_arrays((self._n, width), self._sharding, [mine])
    out = self._permutes[by](glob)
    with self._cond:
      self._results.append(out)
      self._cond.notify_all()
    return out

  def collect(self) -> dict[int, np.ndarray]:
    """Another thread: waits for each chunk in turn; returns ``{process: its buffer}`` of the processes sending here.

    Raises `PeerTransferError` when a chunk could not be placed here.
    """
    try:
      for j, (by, at) in enumerate(self._plan):
        with self._cond:
          while self.dispatched <= j:
            self._cond.wait()
          out = self._results[j]
        self._take(j, by, at, out)
    finally:
      with self._cond:
        self._collector_stopped = True
        self._cond.notify_all()
    if self._errors:
      raise PeerTransferError("; ".join(self._errors))
    return self.received

  def _take(self, j: int, by: int, at: int, out: Any) -> None:
    moved = np.asarray(out.addressable_shards[0].data)[0]
    received = self.received[(self._me - by) % self._n]
    take = max(0, min(self._width, received.size - at))
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

  @property
  def errors(self) -> list[str]:
    return list(self._errors)


def shift(buffer: np.ndarray, by: int, *, timeout_secs: float) -> np.ndarray:
  """Sends `buffer` (uint8) to process ``(me + by) % n``; returns the buffer of process ``(me - by) % n``.

  A process with nothing to send passes an empty buffer. Raises
  `PeerTransferError` on every process when any fails to place a chunk.
  """
  n, me = multihost.process_count(), multihost.process_index()
  sizes = _exchange("local_tier_size", int(buffer.size), timeout_secs)
  copy = PeerCopy(buffer, [by], sizes)
  received = copy.run()[(me - by) % n]
  errors = _exchange("local_tier_chunk", "; ".join(copy.errors) or None, timeout_secs)
  if errors:
    raise PeerTransferError("; ".join(errors[p] for p in sorted(errors)))
  return received


_PERMUTES: dict[Any, Any] = {}


def _shard_map() -> Any:
  if hasattr(jax, "shard_map"):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top  # older JAX

  return shard_map


def _permute(mesh: jax.sharding.Mesh, perm: tuple[tuple[int, int], ...]) -> Any:
  key = (tuple(d.id for d in mesh.devices.flat), perm)
  if key not in _PERMUTES:
    spec = jax.sharding.PartitionSpec("p")
    body = _shard_map()(lambda x: jax.lax.ppermute(x, "p", perm=list(perm)), mesh=mesh, in_specs=spec, out_specs=spec)
    _PERMUTES[key] = jax.jit(body)
  return _PERMUTES[key]
