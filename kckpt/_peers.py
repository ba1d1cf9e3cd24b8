"""Moving a process's packed shards to a peer process and back, with JAX's own collectives.

A `ppermute` over a mesh of one device per process (gloo on CPU, NCCL or ICI
on accelerators), a chunk of at most `CHUNK_BYTES` at a time so that no
device holds more than two chunks. Small values (sizes, errors, host names)
go through JAX's coordination service (`kckpt.multihost.exchange`). Every
function here is a collective: every process calls it, in the same order,
and an error on one process is raised on all of them.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import jax
import numpy as np

from kckpt import multihost

log = logging.getLogger("kckpt")

CHUNK_BYTES = 256 * 2**20


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


def shift(buffer: np.ndarray, by: int, *, timeout_secs: float) -> np.ndarray:
  """Sends `buffer` (uint8) to process ``(me + by) % n``; returns the buffer of process ``(me - by) % n``.

  A process with nothing to send passes an empty buffer. Raises
  `PeerTransferError` on every process when any fails to place a chunk.
  """
  n, me = multihost.process_count(), multihost.process_index()
  sizes = _exchange("local_tier_size", int(buffer.size), timeout_secs)
  width = min(max(max(sizes.values()), 1), CHUNK_BYTES)
  devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
  mesh = jax.sharding.Mesh(np.array(devices), ("p",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
  permute = _permute(mesh, tuple((i, (i + by) % n) for i in range(n)))
  received = np.zeros(0, dtype=np.uint8)
  for at in range(0, max(sizes.values()), width):
    error = None
    try:
      if at == 0:
        received = np.empty(sizes[(me - by) % n], dtype=np.uint8)
      chunk = buffer[at : at + width]
      if chunk.size < width:
        chunk = np.concatenate([chunk, np.zeros(width - chunk.size, np.uint8)])
      mine = jax.device_put(chunk.reshape(1, width), devices[me])
      glob = jax.make_array_from_single_device_arrays((n, width), sharding, [mine])
    except Exception as e:  # pylint: disable=broad-exception-caught  # shared, then raised on every process
      error = f"process {me}: {type(e).__name__}: {e}"
    errors = _exchange("local_tier_chunk", error, timeout_secs)
    if errors:
      raise PeerTransferError("; ".join(errors[p] for p in sorted(errors)))
    moved = np.asarray(permute(glob).addressable_shards[0].data)[0]
    take = max(0, min(width, received.size - at))
    received[at : at + take] = moved[:take]
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
