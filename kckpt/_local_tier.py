"""The fast local tier: steps on each process's own disk, with a copy of its shards on a peer.

A `Checkpointer` with a `local_workdir` also saves, every
`local_save_interval_steps` steps of `maybe_save`, each process's own shards
into its own folder (node-local SSD, a RAM disk) and, with `local_replicas`,
into the folders of the next processes (ring order), so that one lost host
loses no step. Readers of `workdir` never see these steps.

On disk, one folder per step, written as ``.tmp-ckpt_<step>-<id>`` and
renamed to ``ckpt_<step>`` once complete (a crash leaves only the temporary
folder, which no listing counts and the next save removes). It holds
``STEP.json`` (the step, the run's persistent folder, the process count and
index, which processes' shards it holds, whether the step is healthy) and,
per process whose shards it holds, ``p<index>.<k>.bin``: one buffer, as sent
between processes, cut in files of 64 MiB: a header, a JSON manifest (each
leaf's shape, dtype and shards with their global index and offset) and the
bytes of the shards; ``p<index>.crc.json`` has the files' sizes and a CRC32
of each shard, checked on every read.

Peer copies move with JAX's own collectives: a `ppermute` over a mesh of one
device per process (gloo on CPU, NCCL or ICI on accelerators); small
decisions go through JAX's coordination service (`kckpt.multihost`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kckpt import multihost
from kckpt import trees
from kckpt._types import PyTree, Step
from kckpt.errors import BackgroundSaveError

log = logging.getLogger("kckpt")

FORMAT = "kckpt-local/1"
STEP_FILE = "STEP.json"
_MAGIC = b"KCKPTLT1"
_HEADER = struct.Struct("<8sQ")  # magic, manifest length
_ALIGN = 64
_STEP_NAME = re.compile(r"ckpt_(\d+)$")
_TMP_PREFIX = ".tmp-ckpt_"
# Shards are checked (CRC32) in this many threads: zlib releases the GIL.
_CHECK_THREADS = 4
# A process's shards are written in files of this size, and these read and written by this many threads.
_PART_BYTES = 64 * 2**20
_IO_THREADS = 4


class LocalTierUnusable(Exception):
  """A local step cannot be restored (missing shards, another layout, a failed check): use the persistent tier."""


# ---------------------------------------------------------------------------
# Packing a process's shards into one buffer (the file and the message)
# ---------------------------------------------------------------------------


def _index_key(index: Any, shape: Sequence[int]) -> list[list[int]]:
  """A shard's global index as ``[[start, stop], ...]`` (JSON, comparable)."""
  return [[*s.indices(n)[:2]] for s, n in zip(index, shape, strict=True)]


def _host_shards(path: str, leaf: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
  """One leaf's manifest entry and host views of its distinct local shards (copied once, by `pack`)."""
  if isinstance(leaf, jax.Array):
    seen: dict[str, np.ndarray] = {}
    for shard in leaf.addressable_shards:
      key = json.dumps(_index_key(shard.index, leaf.shape))
      if key not in seen:
        seen[key] = np.asarray(shard.data)  # on the CPU a view; from an accelerator, its host copy
    shards = [json.loads(k) for k in seen]
    return {"kind": "array", "shape": list(leaf.shape), "dtype": str(leaf.dtype), "shards": shards}, list(seen.values())
  if isinstance(leaf, (np.ndarray, np.generic)):
    value = np.asarray(leaf)
    scalar = isinstance(leaf, np.generic)
    return {"kind": "numpy", "shape": list(value.shape), "dtype": str(value.dtype), "scalar": scalar}, [value]
  if leaf is None or isinstance(leaf, (bool, int, float, str)):
    return {"kind": "value", "value": leaf}, []
  raise ValueError(f"The local tier cannot save the leaf {path!r} of type {type(leaf).__name__}")


def _aligned(nbytes: int) -> int:
  return -(-nbytes // _ALIGN) * _ALIGN


def pack(tree: PyTree, *, step: Step, owner: int, reuse: np.ndarray | None = None) -> np.ndarray:
  """This process's part of `tree` as one byte buffer: header, manifest, shard bytes (64-byte aligned).

  The buffer is a copy: the caller may change or donate its arrays as soon as
  it returns. It is `reuse` (its start) when that is large enough: fresh
  memory costs a page fault per page, which measured slower than the copy.
  """
  leaves: dict[str, Any] = {}
  pieces: list[np.ndarray] = []
  for path, leaf in trees.flatten_with_paths(tree).items():
    entry, shards = _host_shards(path, leaf)
    entry["pieces"] = list(range(len(pieces), len(pieces) + len(shards)))
    pieces.extend(shards)
    leaves[path] = entry
  offsets, at = [], 0
  for piece in pieces:
    offsets.append(at)
    at += _aligned(piece.nbytes)
  manifest = json.dumps({"format": FORMAT, "step": step, "owner": owner, "leaves": leaves, "offsets": offsets}).encode()
  start = _aligned(_HEADER.size + len(manifest))
  size = start + at
  buffer = reuse[:size] if reuse is not None and reuse.size >= size else np.empty(size, dtype=np.uint8)
  buffer[:start] = 0
  buffer[: _HEADER.size] = np.frombuffer(_HEADER.pack(_MAGIC, len(manifest)), dtype=np.uint8)
  buffer[_HEADER.size : _HEADER.size + len(manifest)] = np.frombuffer(manifest, dtype=np.uint8)
  for piece, offset in zip(pieces, offsets, strict=True):
    buffer[start + offset : start + offset + piece.nbytes] = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
  return buffer


@dataclasses.dataclass(frozen=True)
class Unpacked:
  """A packed buffer read back: its manifest and each piece's bytes (views into the buffer)."""

  manifest: dict[str, Any]
  pieces: list[np.ndarray]


def unpack(buffer: np.ndarray) -> Unpacked:
  magic, length = _HEADER.unpack(bytes(buffer[: _HEADER.size]))
  if magic != _MAGIC:
    raise LocalTierUnusable("not a kckpt local-tier file (bad header)")
  manifest = json.loads(bytes(buffer[_HEADER.size : _HEADER.size + length]))
  start = _aligned(_HEADER.size + length)
  sizes: dict[int, int] = {}
  for entry in manifest["leaves"].values():
    if entry["kind"] == "value":
      continue
    itemsize = jnp.dtype(entry["dtype"]).itemsize
    for i, piece in enumerate(entry["pieces"]):
      shape = entry["shape"] if entry["kind"] == "numpy" else [b - a for a, b in entry["shards"][i]]
      sizes[piece] = int(np.prod(shape, dtype=np.int64)) * itemsize
  pieces = []
  for i, offset in enumerate(manifest["offsets"]):
    pieces.append(buffer[start + offset : start + offset + sizes[i]])
    if pieces[-1].size != sizes[i]:
      raise LocalTierUnusable(f"piece {i} is cut short (the file is truncated)")
  return Unpacked(manifest, pieces)


def checksums(buffer: np.ndarray) -> list[int]:
  pieces = unpack(buffer).pieces
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    return list(pool.map(zlib.crc32, pieces))


def verify(unpacked: Unpacked, expected: Sequence[int], *, where: str) -> None:
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    got = list(pool.map(zlib.crc32, unpacked.pieces))
  if len(got) != len(expected):
    raise LocalTierUnusable(f"{where}: {len(expected)} checksums for {len(got)} shards")
  bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
  if bad:
    names = [p for p, e in unpacked.manifest["leaves"].items() if set(e.get("pieces", ())) & set(bad)]
    raise LocalTierUnusable(f"{where}: checksum mismatch in leaves {names[:10]} (the data changed after it was saved)")


def _healthy(unpacked: Unpacked) -> bool:
  for entry in unpacked.manifest["leaves"].values():
    if entry["kind"] != "value" and jnp.issubdtype(jnp.dtype(entry["dtype"]), jnp.inexact):
      dtype = jnp.dtype(entry["dtype"])
      for piece in entry["pieces"]:
        values = unpacked.pieces[piece].view(dtype)
        # NaN propagates through min and max, and an infinity is one of them: no temporary array.
        if values.size and not (np.isfinite(float(values.min())) and np.isfinite(float(values.max()))):
          return False
    elif entry["kind"] == "value" and isinstance(entry["value"], float) and not np.isfinite(entry["value"]):
      return False
  return True


# ---------------------------------------------------------------------------
# Moving buffers between processes (JAX collectives)
# ---------------------------------------------------------------------------


def ring_shift(buffer: np.ndarray, shift: int, *, timeout_secs: float) -> np.ndarray:
  """Sends `buffer` to process ``(me + shift) % n``; returns the one of process ``(me - shift) % n``.

  Every process must call it, in the same order. A `ppermute` over a mesh
  of one device per process; buffers are padded to the largest.
  """
  n, me = multihost.process_count(), multihost.process_index()
  sizes = multihost.exchange("local_tier_size", int(buffer.size), timeout_secs=timeout_secs, what="a local-tier copy")
  width = max(max(sizes.values()), 1)
  if buffer.size == width:  # the usual case: every process holds as many bytes
    padded = buffer.reshape(1, width)
  else:
    padded = np.zeros((1, width), dtype=np.uint8)
    padded[0, : buffer.size] = buffer
  devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(n)]
  mesh = jax.sharding.Mesh(np.array(devices), ("p",))
  spec = jax.sharding.PartitionSpec("p")
  sharding = jax.sharding.NamedSharding(mesh, spec)
  mine = jax.device_put(padded, devices[me])
  glob = jax.make_array_from_single_device_arrays((n, width), sharding, [mine])
  perm = [(i, (i + shift) % n) for i in range(n)]
  moved = _permute(mesh, tuple(perm))(glob)
  received = np.asarray(moved.addressable_shards[0].data)[0]
  return received[: sizes[(me - shift) % n]]


_PERMUTES: dict[Any, Any] = {}


def _permute(mesh: jax.sharding.Mesh, perm: tuple[tuple[int, int], ...]) -> Any:
  key = (tuple(d.id for d in mesh.devices.flat), perm)
  if key not in _PERMUTES:
    spec = jax.sharding.PartitionSpec("p")
    _PERMUTES[key] = jax.jit(
      jax.shard_map(lambda x: jax.lax.ppermute(x, "p", perm=list(perm)), mesh=mesh, in_specs=spec, out_specs=spec)
    )
  return _PERMUTES[key]


# ---------------------------------------------------------------------------
# The tier
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalStep:
  """What one process's folder says of a local step."""

  step: Step
  owners: tuple[int, ...]
  unusable: str | None  # why it cannot be used by this run, or None


class LocalTier:
  """The local tier of one `Checkpointer` in this process: its folder, a background writer, retention."""

  def __init__(
    self,
    folder: Path,
    *,
    run: str,
    interval: int,
    max_to_keep: int,
    replicas: int,
    durable: bool,
    timeout_secs: float,
  ):
    self.folder = folder
    self.run = run
    self.interval = interval
    self.max_to_keep = max_to_keep
    self.durable = durable
    self.timeout_secs = timeout_secs
    self.replicas = min(replicas, multihost.process_count() - 1)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pending: tuple[Step, concurrent.futures.Future[None]] | None = None
    self._last_saved: Step | None = None
    self._spare: np.ndarray | None = None  # the last save's own buffer, reused once it is written

  # -- Listing ----------------------------------------------------------------

  def listing(self) -> list[LocalStep]:
    """This process's local steps (finished folders only), oldest first."""
    try:
      names = os.listdir(self.folder)
    except (FileNotFoundError, NotADirectoryError):
      return []
    found = []
    for name in names:
      match = _STEP_NAME.match(name)
      if match is None:
        continue
      try:
        record = json.loads((self.folder / name / STEP_FILE).read_bytes())
      except (OSError, ValueError):
        continue  # not ours, or damaged: never listed
      found.append(LocalStep(int(match.group(1)), tuple(record.get("owners", ())), self._unusable(record)))
    return sorted(found, key=lambda s: s.step)

  def _unusable(self, record: Mapping[str, Any]) -> str | None:
    n, me = multihost.process_count(), multihost.process_index()
    if record.get("format") != FORMAT:
      return f"it has another format ({record.get('format')!r})"
    if record.get("run") != self.run:
      return f"it belongs to another run (of {record.get('run')})"
    if record.get("process_count") != n:
      return f"it was saved by {record.get('process_count')} processes, this run has {n}"
    if record.get("process_index") != me:
      return f"it was saved by process {record.get('process_index')}, this is process {me}"
    return None

  def steps(self) -> list[Step]:
    """Steps this process holds its own shards of, for this run."""
    me = multihost.process_index()
    return [s.step for s in self.listing() if s.unusable is None and me in s.owners]

  # -- Saving -----------------------------------------------------------------

  def due(self, step: Step) -> bool:
    return step % self.interval == 0 and step != self._last_saved

  def save(self, tree: PyTree, step: Step, *, async_save: bool) -> None:
    """Saves this process's shards of `tree` (and its peers' copies) as local `step`; every process calls it."""
    self.wait()
    me, n = multihost.process_index(), multihost.process_count()
    spare, self._spare = self._spare, None
    buffers = {me: pack(tree, step=step, owner=me, reuse=spare)}
    for k in range(1, self.replicas + 1):
      buffers[(me - k) % n] = ring_shift(buffers[me], k, timeout_secs=self.timeout_secs)
    self._last_saved = step
    if not async_save:
      self._write(step, buffers)
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kckpt-local-tier")
    self._pending = (step, self._pool.submit(self._write, step, buffers))

  def _write(self, step: Step, buffers: Mapping[int, np.ndarray]) -> None:
    me, n = multihost.process_index(), multihost.process_count()
    self.folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self.folder):
      if name.startswith(_TMP_PREFIX):  # left by a crash; this process is the only writer of its folder
        shutil.rmtree(self.folder / name, ignore_errors=True)
    tmp = self.folder / f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    healthy = True
    for owner, buffer in buffers.items():
      parts = self._write_parts(tmp, owner, buffer)
      self._write_file(tmp / f"p{owner}.crc.json", json.dumps({"parts": parts, "crc32": checksums(buffer)}).encode())
      if owner == me:
        healthy = _healthy(unpack(buffer))
    record = {
      "format": FORMAT,
      "step": step,
      "run": self.run,
      "process_count": n,
      "process_index": me,
      "owners": sorted(buffers),
      "healthy": healthy,
      "time": time.time(),
    }
    self._write_file(tmp / STEP_FILE, json.dumps(record).encode())
    self._spare = buffers[me].base if buffers[me].base is not None else buffers[me]
    final = self.folder / f"ckpt_{step}"
    if final.exists():
      shutil.rmtree(final)
    os.replace(tmp, final)
    if self.durable:
      _fsync_dir(self.folder)
    self._apply_retention()

  def _write_parts(self, folder: Path, owner: int, buffer: np.ndarray) -> list[int]:
    """Writes `buffer` as ``p<owner>.<k>.bin`` files of `_PART_BYTES`, one thread each; returns their sizes.

    Several files, not one: writes to one file are serialised by the file
    system (its inode lock), and a big buffer written by one thread ran at
    half the speed of TensorStore's parallel writes.
    """
    starts = range(0, max(buffer.size, 1), _PART_BYTES)
    views = [buffer[at : at + _PART_BYTES] for at in starts]
    with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
      list(pool.map(lambda k: self._write_file(folder / _part_name(owner, k), views[k].data), range(len(views))))
    return [int(v.size) for v in views]

  def _write_file(self, path: Path, data: Any) -> None:
    with open(path, "wb") as f:
      f.write(data)
      if self.durable:
        f.flush()
        os.fsync(f.fileno())

  def _apply_retention(self) -> None:
    """Keeps the newest `max_to_keep` local steps and the newest healthy one."""
    finished = [s.step for s in self.listing()]
    keep = set(finished[-self.max_to_keep :])
    for step in reversed(finished):
      if _record(self.folder / f"ckpt_{step}").get("healthy", True):
        keep.add(step)
        break
    for step in finished:
      if step not in keep:
        shutil.rmtree(self.folder / f"ckpt_{step}", ignore_errors=True)

  def wait(self) -> None:
    """Waits for the local save in flight; raises its error (naming the step)."""
    pending, self._pending = self._pending, None
    if pending is None:
      return
    step, future = pending
    try:
      future.result()
    except Exception as e:
      raise BackgroundSaveError(f"The local-tier save of step {step} into {self.folder} failed: {e}", step=step) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if self._pool is not None:
        self._pool.shutdown(wait=True)
        self._pool = None

  # -- Restoring --------------------------------------------------------------

  def restore_newest(self, target: PyTree, *, persistent_latest: Step | None) -> tuple[Step, PyTree] | None:
    """The newest local step newer than or as new as `persistent_latest`, restorable by every process.

    Every process must call it. Returns None (and logs why, at INFO) when the
    persistent tier must be used instead.
    """
    self.wait()
    n, me = multihost.process_count(), multihost.process_index()
    listing = self.listing()
    mine = {
      "steps": {str(s.step): list(s.owners) for s in listing if s.unusable is None},
      "unusable": [f"step {s.step}: {s.unusable}" for s in listing if s.unusable is not None][-3:],
    }
    everyone = multihost.exchange(
      "local_tier_inventory", mine, timeout_secs=self.timeout_secs, what="restore from the local tier"
    )
    step, why = _choose(everyone, n, persistent_latest)
    if step is None:
      log.info("kckpt: restoring from the persistent tier: %s", why)
      return None
    holders = {int(q): everyone[q]["steps"][str(step)] for q in everyone if str(step) in everyone[q]["steps"]}
    value: PyTree = None
    error = None
    buffer, own_error = self._own_or_peer_buffer(step, holders)  # collectives: never skipped by an error
    try:
      if buffer is None:
        raise LocalTierUnusable(own_error or "neither this process's folder nor a peer has its shards")
      value = assemble(unpack(buffer), target)
    except Exception as e:  # pylint: disable=broad-exception-caught  # reported to every process, then the persistent tier
      error = f"process {me}: local step {step}: {e}" if isinstance(e, LocalTierUnusable) else f"process {me}: {e!r}"
    failures = multihost.exchange("local_tier_result", error, timeout_secs=self.timeout_secs, what="restore from the local tier")
    if failures:
      log.warning(
        "kckpt: local step %d cannot be restored (%s); restoring from the persistent tier", step, "; ".join(failures.values())
      )
      return None
    log.info("kckpt: restoring step %d from the local tier (%s)", step, self.folder)
    return step, value

  def _exchange(self, name: str, value: Any) -> dict[int, Any]:
    return multihost.exchange(name, value, timeout_secs=self.timeout_secs, what="a restore from the local tier")

  def _own_or_peer_buffer(self, step: Step, holders: Mapping[int, Sequence[int]]) -> tuple[np.ndarray | None, str | None]:
    """This process's packed shards of `step` (from its folder, else sent by the peer holding a copy), or why not.

    Every process makes the same exchanges whatever it finds.
    """
    n, me = multihost.process_count(), multihost.process_index()
    need = {p for p in range(n) if p not in holders.get(p, ())}
    buffer, error = None, None
    if me not in need:
      try:
        buffer = self._read(step, me)
      except LocalTierUnusable as e:
        error = str(e)
    for k in range(1, self.replicas + 1):  # round k: process q sends its copy of process q - k
      if not need:
        break
      owner = (me - k) % n
      send = np.zeros(0, np.uint8)
      if owner in need and owner in holders.get(me, ()):
        try:
          send = self._read(step, owner)
        except LocalTierUnusable as e:
          log.warning("kckpt: the copy of process %d's shards of local step %d here is unusable: %s", owner, step, e)
      got = ring_shift(send, -k, timeout_secs=self.timeout_secs)
      served = multihost.exchange(
        "local_tier_served", owner if send.size else None, timeout_secs=self.timeout_secs, what="restore"
      )
      if me in need and got.size:
        buffer = got
      need -= set(served.values())
    return buffer, error

  def _read(self, step: Step, owner: int) -> np.ndarray:
    folder = self.folder / f"ckpt_{step}"
    where = f"{folder}/p{owner}.*.bin"
    try:
      index = json.loads((folder / f"p{owner}.crc.json").read_bytes())
      buffer = read_parts(folder, owner, index["parts"])
    except (OSError, ValueError, KeyError) as e:
      raise LocalTierUnusable(f"{where}: {e}") from e
    verify(unpack(buffer), index["crc32"], where=where)
    return buffer


def _part_name(owner: int, k: int) -> str:
  return f"p{owner}.{k}.bin"


def read_parts(folder: Path, owner: int, sizes: Sequence[int]) -> np.ndarray:
  """The packed buffer of process `owner` in the step `folder`, its parts read by several threads."""
  buffer = np.empty(sum(sizes), dtype=np.uint8)
  starts = np.cumsum([0, *sizes[:-1]]).tolist()

  def read(k: int) -> None:
    path = folder / _part_name(owner, k)
    with open(path, "rb", buffering=0) as f:
      got = f.readinto(buffer[starts[k] : starts[k] + sizes[k]].data)
      if got != sizes[k] or f.read(1):
        raise LocalTierUnusable(f"{path} has another size than when it was written")

  with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
    list(pool.map(read, range(len(sizes))))
  return buffer


def _record(step_folder: Path) -> dict[str, Any]:
  try:
    return json.loads((step_folder / STEP_FILE).read_bytes())
  except (OSError, ValueError):
    return {}


def _fsync_dir(folder: Path) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _choose(everyone: Mapping[int, Any], n: int, persistent_latest: Step | None) -> tuple[Step | None, str]:
  """The newest step whose shards of every process are held somewhere, and otherwise why there is none."""
  held: dict[Step, set[int]] = {}
  for inventory in everyone.values():
    for step, owners in inventory["steps"].items():
      held.setdefault(int(step), set()).update(owners)
  complete = sorted(s for s, owners in held.items() if owners >= set(range(n)))
  if not complete:
    notes = [u for inv in everyone.values() for u in inv["unusable"]]
    if held:
      newest = max(held)
      return None, f"local step {newest} lacks the shards of processes {sorted(set(range(n)) - held[newest])}"
    return None, "no local step of this run" + (f" ({'; '.join(notes[:3])})" if notes else "")
  if persistent_latest is not None and complete[-1] < persistent_latest:
    return None, f"the newest local step ({complete[-1]}) is older than the persistent step {persistent_latest}"
  return complete[-1], ""


def assemble(unpacked: Unpacked, target: PyTree) -> PyTree:
  """Places the leaves of `unpacked` into the structure, dtypes and shardings of `target`."""
  leaves = unpacked.manifest["leaves"]
  wanted = trees.flatten_with_paths(target)
  if set(wanted) != set(leaves):
    missing, extra = sorted(set(wanted) - set(leaves)), sorted(set(leaves) - set(wanted))
    raise LocalTierUnusable(f"another tree (missing {missing[:5]}, unexpected {extra[:5]})")
  out = {path: _place(path, leaves[path], unpacked.pieces, goal) for path, goal in wanted.items()}
  return trees.replace_leaves(target, out)


def _place(path: str, entry: Mapping[str, Any], pieces: Sequence[np.ndarray], goal: Any) -> Any:
  if entry["kind"] == "value":
    return entry["value"]
  dtype = jnp.dtype(entry["dtype"])
  shape = tuple(entry["shape"])
  if entry["kind"] == "numpy":
    value = pieces[entry["pieces"][0]].view(dtype).reshape(shape).copy()
    if isinstance(goal, jax.Array | jax.ShapeDtypeStruct):
      return jax.device_put(value.astype(goal.dtype, copy=False), getattr(goal, "sharding", None))
    return value[()] if entry.get("scalar") else value
  goal_shape = tuple(getattr(goal, "shape", ()))
  if goal_shape != shape:
    raise LocalTierUnusable(f"leaf {path!r} has shape {shape}, the target {goal_shape}")
  sharding = getattr(goal, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  goal_dtype = getattr(goal, "dtype", dtype)
  by_index = {json.dumps(index): entry["pieces"][i] for i, index in enumerate(entry["shards"])}
  arrays = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = json.dumps(_index_key(index, shape))
    if key not in by_index:
      raise LocalTierUnusable(f"leaf {path!r}: no saved shard {key} (the target is sharded otherwise)")
    block = pieces[by_index[key]].view(dtype).reshape([b - a for a, b in json.loads(key)])
    arrays.append(jax.device_put(block.astype(goal_dtype, copy=False), device))
  if isinstance(goal, np.ndarray):
    return np.asarray(arrays[0])
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
