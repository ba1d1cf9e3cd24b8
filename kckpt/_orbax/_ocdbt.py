"""Where each value of a local OCDBT database lies, read straight from its manifest and B-tree nodes.

Orbax stores every array chunk as a key of a TensorStore OCDBT database
(``b"params.w/0.0"``), its bytes either inside a B-tree leaf node (small
values) or at an offset of a data file under ``d/``. kckpt needs, for each
key, that file, offset and length. TensorStore's ``ts.ocdbt.dump`` gives them,
but in TensorStore 0.1.86 every key and value of the dicts it returns keeps a
reference too many: about 1 KB leaked per key per call. This module decodes the
few structures needed instead, in plain Python.

It reads the single manifest file ``manifest.ocdbt``, takes the latest version
(the last of the versions the manifest lists inline), and walks that version's
whole B-tree. Only what Orbax writes is understood: a single manifest, format
version 0, no compression or zstd. Anything else, and anything damaged (bad
magic number, CRC-32C mismatch, truncated or missing file), raises
`OcdbtFormatError`, which callers take as "ask TensorStore instead"; the reader
never guesses. A missing manifest raises `OcdbtFormatError` too (its
``__cause__`` is the `FileNotFoundError`), so one ``except`` covers every case.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys

import crc32c

MANIFEST_FILE = "manifest.ocdbt"
_MANIFEST_MAGIC = 0x0CDB3A2A
_BTREE_NODE_MAGIC = 0x0CDB20DE
_MISSING = (1 << 64) - 1  # offset and length of the root of a version with no keys


class OcdbtFormatError(ValueError):
  """The database cannot be read here (damaged, missing or in a form this reader does not know)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ValueRef:
  """A byte range of a file: ``length`` bytes at ``offset`` of ``path``."""

  path: str
  offset: int
  length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Index:
  """Every key of a database's latest version, and the B-tree nodes that were read to list them."""

  indirect: dict[bytes, ValueRef]  # key -> where its value lies (values stored out of line)
  inline: dict[bytes, bytes]  # key -> value, for values stored inside the B-tree leaf nodes
  nodes: tuple[ValueRef, ...]  # every B-tree node read


def read_index(root: str) -> Index:
  """The latest version of the OCDBT database whose manifest is `root`/manifest.ocdbt."""
  path = os.path.join(root, MANIFEST_FILE)
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except FileNotFoundError as e:
    raise OcdbtFormatError(f"{path}: missing") from e
  except (OSError, ValueError) as e:  # ValueError: a path with a NUL
    raise OcdbtFormatError(f"{path}: unreadable ({e})") from e
  try:
    top = _latest_root(_unwrap(encoded, _MANIFEST_MAGIC))
  except IndexError:
    raise OcdbtFormatError(f"{path}: manifest ends early") from None
  except OcdbtFormatError as e:
    raise OcdbtFormatError(f"{path}: {e}") from None
  return _walk(root, top)


def _unwrap(encoded: bytes, magic: int) -> bytes:
  """The body of an encoded manifest or node (header, body, CRC-32C), checked and decompressed."""
  # Header: magic (uint32 big-endian), total length (uint64 little-endian), format
  # version (varint, 0) and compression (varint: 0 none, 1 zstd); then the body; then
  # the CRC-32C of all that precedes it (uint32 little-endian).
  if len(encoded) < 16:
    raise OcdbtFormatError(f"{len(encoded)} bytes, too short")
  found, length = struct.unpack_from("<4sQ", encoded)
  if int.from_bytes(found, "big") != magic:
    raise OcdbtFormatError(f"starts with {found.hex()}, expected {magic:08x}")
  if length != len(encoded):
    raise OcdbtFormatError(f"{len(encoded)} bytes, its header says {length}")
  (stored,) = struct.unpack_from("<I", encoded, len(encoded) - 4)
  if crc32c.crc32c(encoded[:-4]) != stored:
    raise OcdbtFormatError("CRC-32C mismatch")
  (version, compression), pos = _varints(encoded, 12, 2)
  if version != 0:
    raise OcdbtFormatError(f"format version {version}, only 0 is known")
  if compression == 0:
    return encoded[pos:-4]
  if compression != 1:
    raise OcdbtFormatError(f"unknown compression {compression}")
  try:
    if sys.version_info >= (3, 14):
      from compression import zstd
    else:
      from backports import zstd
  except ImportError as e:
    raise OcdbtFormatError("zstd-compressed, and no zstd module (pip install backports.zstd)") from e
  try:
    return zstd.decompress(encoded[pos:-4])
  except zstd.ZstdError as e:
    raise OcdbtFormatError(f"zstd: {e}") from e


def _varints(buf: bytes, pos: int, count: int) -> tuple[list[int], int]:
  """`count` unsigned LEB128 varints from `buf` at `pos`, and the position after them (IndexError at the end)."""
  values: list[int] = []
  append = values.append
  for _ in range(count):
    byte = buf[pos]
    pos += 1
    if byte < 0x80:
      append(byte)
      continue
    value, shift = byte & 0x7F, 7
    while True:
      byte = buf[pos]
      pos += 1
      value |= (byte & 0x7F) << shift
      if byte < 0x80:
        break
      shift += 7
      if shift > 63:
        raise OcdbtFormatError(f"varint at byte {pos} longer than 10 bytes")
    append(value)
  return values, pos


def _file_table(buf: bytes, pos: int, base: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
  """A data file table: ``(base path, relative path)`` per file, the base path under `base`."""
  # Count; then the paths (base path + relative path), each but the first stored as the
  # length of the prefix it shares with the previous one and the rest: prefix lengths,
  # suffix lengths, base path lengths, then the suffixes.
  (count,), pos = _varints(buf, pos, 1)
  if count == 0:
    return [], pos
  prefixes, pos = _varints(buf, pos, count - 1)
  suffixes, pos = _varints(buf, pos, count)
  base_lengths, pos = _varints(buf, pos, count)
  files, previous = [], b""
  for prefix, suffix, base_length in zip([0, *prefixes], suffixes, base_lengths, strict=True):
    if prefix > len(previous) or pos + suffix > len(buf) or base_length > prefix + suffix:
      raise OcdbtFormatError(f"data file table: bad path lengths ({prefix}, {suffix}, {base_length})")
    previous = previous[:prefix] + buf[pos : pos + suffix]
    pos += suffix
    files.append((base + previous[:base_length], previous[base_length:]))
  return files, pos


def _refs(buf: bytes, pos: int, count: int, files: list[tuple[bytes, bytes]]) -> tuple[list[tuple[int, int, int]], int]:
  """`count` (file id, offset, length) references, stored as three columns."""
  ids, pos = _varints(buf, pos, count)
  offsets, pos = _varints(buf, pos, count)
  lengths, pos = _varints(buf, pos, count)
  if any(i >= len(files) for i in ids):
    raise OcdbtFormatError(f"data file id outside the table of {len(files)}")
  return list(zip(ids, offsets, lengths, strict=True)), pos


_Location = tuple[bytes, bytes, int, int, int]  # base path, relative path, offset, length, B-tree height


def _latest_root(body: bytes) -> _Location | None:
  """The root node of the manifest's latest version (None: no keys)."""
  # Config: uuid (16 bytes), manifest kind (byte: 0 single, 1 numbered), max inline value
  # bytes and max decoded node bytes (varints), version tree arity log2 (byte), compression
  # method (varint, then for zstd its level as int32 little-endian).
  if body[16] != 0:
    raise OcdbtFormatError(f"manifest kind {body[16]}, only 0 (single file) is known")
  (_, _), pos = _varints(body, 17, 2)
  arity_log2 = body[pos]
  (method,), pos = _varints(body, pos + 1, 1)
  if method not in (0, 1):
    raise OcdbtFormatError(f"unknown compression method {method}")
  pos += 4 * method
  files, pos = _file_table(body, pos, b"")
  # The newest versions, inline: generation numbers, root heights (bytes), root node
  # references, their statistics (three varints each), commit times (8 bytes each).
  (count,), pos = _varints(body, pos, 1)
  if not 1 <= count <= 1 << arity_log2:
    raise OcdbtFormatError(f"{count} inline versions")
  generations, pos = _varints(body, pos, count)
  heights, pos = body[pos : pos + count], pos + count
  roots, pos = _refs(body, pos, count, files)
  _, pos = _varints(body, pos, 3 * count)
  pos += 8 * count
  # Then the older versions' version tree nodes: count, generation numbers, references,
  # generation counts, commit times, heights. Read only to check the body ends with them.
  (count,), pos = _varints(body, pos, 1)
  _, pos = _varints(body, pos, 5 * count)
  pos += 9 * count
  if pos != len(body):
    raise OcdbtFormatError(f"{len(body) - pos} bytes left after the version tree")
  if any(a >= b for a, b in zip(generations, generations[1:], strict=False)):
    raise OcdbtFormatError("generation numbers out of order")
  file_id, offset, length = roots[-1]
  if offset == length == _MISSING:
    return None
  return (*files[file_id], offset, length, heights[-1])


def _walk(root: str, top: _Location | None) -> Index:
  """Reads every node of the B-tree under `top`; keys are the full keys."""
  indirect: dict[bytes, ValueRef] = {}
  inline: dict[bytes, bytes] = {}
  nodes: list[ValueRef] = []
  pending = [(top, b"")] if top else []  # (node, the prefix of every key under it)
  while pending:
    (base, relative, offset, length, height), prefix = pending.pop()
    path = os.path.join(root, _text(base + relative))
    where = f"{path} at offset {offset}"
    try:
      with open(path, "rb") as f:
        f.seek(offset)
        encoded = f.read(length)
    except FileNotFoundError as e:
      raise OcdbtFormatError(f"{path}: B-tree node file unreadable ({e})") from e
    except (OSError, OverflowError, ValueError) as e:
      raise OcdbtFormatError(f"{where}: B-tree node unreadable ({e})") from e
    if len(encoded) != length:
      raise OcdbtFormatError(f"{where}: B-tree node of {length} bytes, only {len(encoded)} in the file (truncated)")
    nodes.append(ValueRef(path, offset, length))
    before = len(indirect) + len(inline)
    try:
      children, entries = _read_node(_unwrap(encoded, _BTREE_NODE_MAGIC), base, height, prefix, root, indirect, inline)
    except IndexError:
      raise OcdbtFormatError(f"{where}: B-tree node ends early") from None
    except OcdbtFormatError as e:
      raise OcdbtFormatError(f"{where}: {e}") from None
    if len(indirect) + len(inline) != before + entries:
      raise OcdbtFormatError(f"{where}: B-tree node repeats keys seen before")
    pending.extend(reversed(children))  # in key order
  return Index(indirect, inline, tuple(nodes))


def _read_node(
  body: bytes,
  base: bytes,
  height: int,
  prefix: bytes,
  root: str,
  indirect: dict[bytes, ValueRef],
  inline: dict[bytes, bytes],
) -> tuple[list[tuple[_Location, bytes]], int]:
  """Adds a node's leaf entries to `indirect`/`inline`; returns its children (interior node) and leaf entry count."""
  # Height (byte), data file table, entry count; then the keys: the length each shares
  # with the previous key, the length of the rest, (interior) the length of the prefix
  # common to the child's whole subtree, then the rests of the keys.
  if body[0] != height:
    raise OcdbtFormatError(f"height {body[0]}, its parent says {height}")
  files, pos = _file_table(body, 1, base)
  (count,), pos = _varints(body, pos, 1)
  if count == 0:
    raise OcdbtFormatError("no entries")
  shared, pos = _varints(body, pos, count - 1)
  rests, pos = _varints(body, pos, count)
  if height:
    subtree, pos = _varints(body, pos, count)
  keys, key = [], b""
  for length, rest in zip([0, *shared], rests, strict=True):
    if length > len(key) or pos + rest > len(body):
      raise OcdbtFormatError("bad key lengths")
    key = key[:length] + body[pos : pos + rest]
    pos += rest
    keys.append(key)
  if height:
    # Children: references (file ids, offsets, lengths), then statistics (three varints each).
    refs, pos = _refs(body, pos, count, files)
    _, pos = _varints(body, pos, 3 * count)
    if pos != len(body):
      raise OcdbtFormatError(f"{len(body) - pos} bytes left after the entries")
    children = []
    for key, common, (file_id, offset, length) in zip(keys, subtree, refs, strict=True):
      if common > len(key):
        raise OcdbtFormatError("subtree prefix longer than its key")
      children.append(((*files[file_id], offset, length, height - 1), prefix + key[:common]))
    return children, 0
  # Leaf: value lengths, value kinds (bytes: 0 inline, 1 out of line), the out-of-line
  # values' file ids and offsets, then the inline values, concatenated.
  lengths, pos = _varints(body, pos, count)
  kinds, pos = body[pos : pos + count], pos + count
  if len(kinds) != count or kinds.translate(None, b"\0\1"):  # anything but 0 and 1 left
    raise OcdbtFormatError("bad value kinds")
  out_of_line = kinds.count(1)
  ids, pos = _varints(body, pos, out_of_line)
  offsets, pos = _varints(body, pos, out_of_line)
  paths = {}
  for file_id in set(ids):
    if file_id >= len(files):
      raise OcdbtFormatError(f"data file id {file_id} outside the table of {len(files)}")
    paths[file_id] = os.path.join(root, _text(b"".join(files[file_id])))
  refs_left = iter(zip(ids, offsets, strict=True))
  for key, length, kind in zip(keys, lengths, kinds, strict=True):
    if kind:
      file_id, offset = next(refs_left)
      indirect[prefix + key] = ValueRef(paths[file_id], offset, length)
    else:
      if pos + length > len(body):
        raise OcdbtFormatError("inline values end early")
      inline[prefix + key] = body[pos : pos + length]
      pos += length
  if pos != len(body):
    raise OcdbtFormatError(f"{len(body) - pos} bytes left after the values")
  return [], count


def _text(path: bytes) -> str:
  """A data file path (bytes in the format, relative to the database) as text; one that leaves it is refused."""
  try:
    text = path.decode()
  except UnicodeDecodeError:
    raise OcdbtFormatError(f"data file path {path!r} is not UTF-8") from None
  # TensorStore's file driver refuses such keys; a reader of the files must not follow them out of the folder.
  if not text or text.startswith("/") or "\0" in text or ".." in text.split("/"):
    raise OcdbtFormatError(f"data file path {text!r} is not a path inside the database")
  return text
