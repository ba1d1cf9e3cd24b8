"""Checking, before a restore frees anything, that every data file an item will read is there and whole.

For OCDBT items (kckpt's and Orbax's default) the database's index
(`_ocdbt`) gives each value's file, offset and length: a file that is missing
or shorter than the bytes its metadata points into is reported. Only small
files are read (the manifest and B-tree nodes) and data files are only
stat-ed. An index that `_ocdbt` cannot read (damaged, a numbered
manifest, or zstd-compressed nodes on a Python without a zstd module) is
walked again with TensorStore's own dump, node by node, which says what is
wrong; the dump leaks about 1 KB per key in TensorStore 0.1.86. For plain
Zarr items (``use_ocdbt=False``) each chunk file must exist, with its exact
size when the array is uncompressed Zarr v2.
"""

from __future__ import annotations

import ast
import json
import math
import os
from typing import Any

import numpy as np
import tensorstore as ts
from etils import epath

from kckpt import _fs
from kckpt._orbax import _format, _ocdbt

_VALUE = "value:"
_NODE = "btreenode:"


def damaged_files(item_dir: epath.Path) -> list[str]:
  """One line per missing or truncated data file of the pytree item at `item_dir` (empty: all whole).

  Each line names the leaves whose data the file holds, where the format says
  (``unreadable leaves ['w']: .../d/ab12: 100 bytes, its metadata says at least 4000``).

  Local folders only (on object stores an upload is whole or absent); anything
  this check does not understand is left for the read itself to report.
  """
  if not _fs.is_local(item_dir):
    return []
  try:
    meta = json.loads((item_dir / _format.ITEM_METADATA_FILE).read_text())
  except (FileNotFoundError, NotADirectoryError):
    return [f"{item_dir / _format.ITEM_METADATA_FILE}: missing"]
  except json.JSONDecodeError as e:
    return [f"{item_dir / _format.ITEM_METADATA_FILE}: not valid JSON ({e})"]
  if meta.get("use_ocdbt") is True:
    return _damaged_ocdbt(str(item_dir))
  if meta.get("use_ocdbt") is False and meta.get("use_zarr3") is False:
    return _damaged_zarr2(str(item_dir))
  return []


def _need(required: dict[str, int], root: str, reference: str, prefix: str) -> str:
  """Records that file ``root/<prefix><path>`` must hold at least offset + length bytes; returns the file."""
  # "<path>:<offset>:<length>", the path relative to the database (or to `prefix`).
  path, offset, length = reference.rsplit(":", 2)
  full = os.path.join(root, prefix + path)
  required[full] = max(required.get(full, 0), int(offset) + int(length))
  return full


def _key_bytes(key: Any) -> bytes:
  """A key as TensorStore's dump gives it (the repr of a bytes value, ``"b'params.w/0'"``) as bytes."""
  if isinstance(key, bytes):
    return key
  text = str(key)
  if text.startswith(("b'", 'b"')):
    value = ast.literal_eval(text)
    if isinstance(value, bytes):
      return value
  return text.encode()


def _leaf_of(key: bytes) -> str:
  """An OCDBT key (the leaf's parameter name, then the chunk) -> the leaf: ``b'params.w/0.0'`` (Zarr v2)
  and ``b'params.w/c/0/0'`` (Zarr v3) -> ``params.w``. Orbax's parameter names hold no ``/``.
  """
  return key.decode("utf-8", errors="replace").split("/", 1)[0]


def _damaged_ocdbt(root: str) -> list[str]:
  try:
    index = _ocdbt.read_index(root)
  except _ocdbt.OcdbtFormatError:
    return _damaged_ocdbt_told_by_tensorstore(root)
  required: dict[str, int] = {}
  leaves: dict[str, set[str]] = {}  # data file -> leaves with data in it
  for key, ref in index.indirect.items():
    required[ref.path] = max(required.get(ref.path, 0), ref.offset + ref.length)
    leaves.setdefault(ref.path, set()).add(_leaf_of(key))
  problems: list[str] = []
  for path, size in sorted(required.items()):
    problems.extend(f"unreadable leaves {sorted(leaves[path])}: " + p for p in _size_problem(path, size, exact=False))
  return problems


def _damaged_ocdbt_told_by_tensorstore(root: str) -> list[str]:
  kvstore = ts.KvStore.open({"driver": "file", "path": root.rstrip("/") + "/"}).result()
  try:
    manifest = ts.ocdbt.dump(kvstore).result()
  except ValueError as e:  # the manifest itself is missing or damaged
    return [f"{root}: OCDBT manifest unreadable ({str(e).splitlines()[0]})"]
  required: dict[str, int] = {}
  leaves: dict[str, set[str]] = {}  # data file -> leaves with data in it
  problems: list[str] = []
  # (node location, the key prefix of its subtree): interior nodes give each child's
  # location and common key prefix; leaf entries' keys are relative to it.
  nodes = [(v["root"]["location"], b"") for v in manifest.get("versions", [])[-1:] if v.get("root", {}).get("location")]
  while nodes:
    location, prefix_bytes = nodes.pop()
    _, _, reference = location.partition("::")
    _need(required, root, reference, "")
    try:
      node = ts.ocdbt.dump(kvstore, location).result()
    except ValueError as e:
      problems.append(f"{root}: B-tree node {reference} unreadable ({str(e).splitlines()[0]})")
      continue
    for entry in node.get("entries", []):
      child = entry.get("location")
      if isinstance(child, str) and child.startswith(_NODE):
        nodes.append((child, prefix_bytes + _key_bytes(entry.get("subtree_common_prefix", b""))))
        continue
      value = entry.get("indirect_value")
      if isinstance(value, str) and value.startswith(_VALUE):
        prefix, _, reference = value[len(_VALUE) :].partition(":")
        key = prefix_bytes + _key_bytes(entry.get("key", b""))
        leaves.setdefault(_need(required, root, reference, prefix), set()).add(_leaf_of(key))
  for path, size in sorted(required.items()):
    named = f"unreadable leaves {sorted(leaves[path])}: " if path in leaves else ""
    problems.extend(named + p for p in _size_problem(path, size, exact=False))
  return problems


def _damaged_zarr2(root: str) -> list[str]:
  problems = []
  for folder, _, files in os.walk(root):
    if ".zarray" not in files:
      continue
    with open(os.path.join(folder, ".zarray")) as f:
      zarray: dict[str, Any] = json.load(f)
    shape, chunks = zarray.get("shape", []), zarray.get("chunks", [])
    grid = [range(math.ceil(s / c)) if c else range(1) for s, c in zip(shape, chunks, strict=False)]
    separator = zarray.get("dimension_separator", ".")
    chunk_bytes = math.prod(chunks) * np.dtype(zarray["dtype"]).itemsize if zarray.get("compressor") is None else None
    for index in np.ndindex(*[len(g) for g in grid]) if grid else [()]:
      name = separator.join(map(str, index)) if index else "0"
      problems.extend(
        _size_problem(os.path.join(folder, name), chunk_bytes, exact=True, missing_ok=zarray.get("fill_value") is not None)
      )
  return problems


def _size_problem(path: str, size: int | None, *, exact: bool, missing_ok: bool = False) -> list[str]:
  try:
    actual = os.stat(path).st_size
  except FileNotFoundError:
    return [] if missing_ok else [f"{path}: missing"]
  if size is None:
    return []
  if (actual != size) if exact else (actual < size):
    return [f"{path}: {actual} bytes, its metadata says {'' if exact else 'at least '}{size}"]
  return []
