"""The local tier's format: a process's shards packed into one buffer, its checksums, its files.

The same buffer is the message sent to a peer and the content of the files:
a header (magic, manifest length), a JSON manifest (each leaf's kind, shape,
dtype and, for arrays, the global index of each of its distinct local
shards; Python values inline), then the bytes of the shards, each 64-byte
aligned. On disk it is cut in files of `PART_BYTES` (``p<owner>.<k>.bin``),
written and read by several threads; ``p<owner>.crc.json`` holds the files'
sizes, a CRC32 of the header and manifest and a CRC32 of each shard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kckpt import trees
from kckpt._types import PyTree, Step

FORMAT = "kckpt-local/1"
_MAGIC = b"KCKPTLT1"
_HEADER = struct.Struct("<8sQ")  # magic, manifest length
_ALIGN = 64
# Shards are checked (CRC32) in this many threads: zlib releases the GIL.
_CHECK_THREADS = 4
# A process's buffer is written in files of this size, read and written by this many threads.
PART_BYTES = 64 * 2**20
IO_THREADS = 4


class LocalTierUnusable(Exception):
  """A local step cannot be restored (missing shards, another layout, a failed check): use the persistent tier."""


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
  """The manifest and pieces of a packed buffer; `LocalTierUnusable` for anything that is not one."""
  try:
    return _unpack(buffer)
  except LocalTierUnusable:
    raise
  except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
    raise LocalTierUnusable(f"not a readable local-tier buffer ({type(e).__name__}: {e})") from e


def head_size(buffer: np.ndarray) -> int:
  """The bytes of the header and manifest, padding included (checked by their own CRC32)."""
  _, length = _HEADER.unpack(bytes(buffer[: _HEADER.size]))
  return _aligned(_HEADER.size + length)


def _unpack(buffer: np.ndarray) -> Unpacked:
  magic, length = _HEADER.unpack(bytes(buffer[: _HEADER.size]))
  if magic != _MAGIC:
    raise LocalTierUnusable("not a kckpt local-tier buffer (bad header)")
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


def checksums(buffer: np.ndarray) -> dict[str, Any]:
  """The CRC32 of the header and manifest (``head``) and of each piece (``pieces``) of a packed buffer."""
  pieces = unpack(buffer).pieces
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    return {"head": zlib.crc32(buffer[: head_size(buffer)].data), "pieces": list(pool.map(zlib.crc32, pieces))}


def verify(buffer: np.ndarray, expected: Mapping[str, Any], *, where: str) -> Unpacked:
  """Unpacks `buffer`, checking every CRC32 of `expected` (`checksums` at save); `LocalTierUnusable` names the leaves."""
  try:
    head_ok = zlib.crc32(buffer[: head_size(buffer)].data) == expected["head"]
  except (struct.error, KeyError, TypeError) as e:
    raise LocalTierUnusable(f"{where}: unreadable header or checksums ({e})") from e
  if not head_ok:
    raise LocalTierUnusable(f"{where}: checksum mismatch in the header or manifest (the file changed after it was saved)")
  unpacked = unpack(buffer)
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    got = list(pool.map(zlib.crc32, unpacked.pieces))
  if len(got) != len(expected["pieces"]):
    raise LocalTierUnusable(f"{where}: {len(expected['pieces'])} checksums for {len(got)} shards")
  bad = {i for i, (a, b) in enumerate(zip(got, expected["pieces"], strict=True)) if a != b}
  if bad:
    names = [p for p, e in unpacked.manifest["leaves"].items() if set(e.get("pieces", ())) & bad]
    raise LocalTierUnusable(f"{where}: checksum mismatch in leaves {names[:10]} (the data changed after it was saved)")
  return unpacked


def healthy(unpacked: Unpacked) -> bool:
  """No NaN or infinity in a floating leaf (real and imaginary parts), computed without temporary arrays."""
  for entry in unpacked.manifest["leaves"].values():
    if entry["kind"] == "value":
      if isinstance(entry["value"], float) and not np.isfinite(entry["value"]):
        return False
      continue
    dtype = jnp.dtype(entry["dtype"])
    if not jnp.issubdtype(dtype, jnp.inexact):
      continue
    parts = np.dtype(dtype).itemsize // 2 if jnp.issubdtype(dtype, jnp.complexfloating) else 0
    component = jnp.dtype(f"float{parts * 8}") if parts else dtype
    for piece in entry["pieces"]:
      values = unpacked.pieces[piece].view(component)
      # NaN propagates through min and max, and an infinity is one of them.
      if values.size and not (np.isfinite(float(values.min())) and np.isfinite(float(values.max()))):
        return False
  return True


def write_parts(folder: Path, owner: int, buffer: np.ndarray, *, durable: bool) -> list[int]:
  """Writes `buffer` as ``p<owner>.<k>.bin`` files of `PART_BYTES`, by several threads; returns their sizes.

  Several files, not one: writes to one file are serialised by the file
  system (its inode lock); one big file written by one thread ran at half
  the speed of TensorStore's parallel writes.
  """
  views = [buffer[at : at + PART_BYTES] for at in range(0, max(buffer.size, 1), PART_BYTES)]

  def write(k: int) -> None:
    with open(folder / part_name(owner, k), "wb") as f:
      f.write(views[k].data)
      if durable:
        f.flush()
        os.fsync(f.fileno())

  with concurrent.futures.ThreadPoolExecutor(IO_THREADS) as pool:
    list(pool.map(write, range(len(views))))
  return [int(v.size) for v in views]


def part_name(owner: int, k: int) -> str:
  return f"p{owner}.{k}.bin"


def read_parts(folder: Path, owner: int, sizes: Sequence[int]) -> np.ndarray:
  """The packed buffer of process `owner` in the step `folder`, its parts read by several threads."""
  buffer = np.empty(sum(sizes), dtype=np.uint8)
  starts = np.cumsum([0, *sizes[:-1]]).tolist()

  def read(k: int) -> None:
    path = folder / part_name(owner, k)
    with open(path, "rb", buffering=0) as f:
      got = f.readinto(buffer[starts[k] : starts[k] + sizes[k]].data)
      if got != sizes[k] or f.read(1):
        raise LocalTierUnusable(f"{path} has another size than when it was written")

  with concurrent.futures.ThreadPoolExecutor(IO_THREADS) as pool:
    list(pool.map(read, range(len(sizes))))
  return buffer


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
    if not isinstance(goal, jax.Array | jax.ShapeDtypeStruct):
      return value[()] if entry.get("scalar") else value
    # Saved whole (the same on every process): each device gets its part, with no collective.
    by_index = None
  else:
    by_index = {json.dumps(index): entry["pieces"][i] for i, index in enumerate(entry["shards"])}
    value = None
  goal_shape = tuple(getattr(goal, "shape", ()))
  if goal_shape != shape:
    raise LocalTierUnusable(f"leaf {path!r} has shape {shape}, the target {goal_shape}")
  sharding = getattr(goal, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  goal_dtype = getattr(goal, "dtype", dtype)
  arrays = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    key = json.dumps(_index_key(index, shape))
    if by_index is None:
      block = value[tuple(slice(a, b) for a, b in json.loads(key))]
    elif key in by_index:
      block = pieces[by_index[key]].view(dtype).reshape([b - a for a, b in json.loads(key)])
    else:
      raise LocalTierUnusable(f"leaf {path!r}: no saved shard {key} (the target is sharded otherwise)")
    arrays.append(jax.device_put(block.astype(goal_dtype, copy=False), device))
  if isinstance(goal, np.ndarray):
    return np.asarray(arrays[0])
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
