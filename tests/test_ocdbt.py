"""kckpt's own OCDBT index reader agrees with TensorStore's dump, and refuses damaged or unknown databases.

Each database is read twice: by `_ocdbt.read_index` and by walking
``ts.ocdbt.dump`` (the manifest, then every B-tree node). The two must give the
same keys, value locations, inline values and nodes; and the bytes at each
location must be the value TensorStore itself reads for that key.
"""

import ast
import os
import shutil
import struct

import crc32c
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import kckpt
from kckpt._orbax import _ocdbt

# ---------------------------------------------------------------------------
# The reference: TensorStore's dump, and TensorStore's own reads
# ---------------------------------------------------------------------------


def _literal(text):
  """A key or inline value as the dump gives it (``"b'params.w/0'"``, or bytes) as bytes."""
  value = text if isinstance(text, bytes) else ast.literal_eval(text)
  assert isinstance(value, bytes)
  return value


def _ref(root, location, kind):
  """``"value:<base>:<relative>:<offset>:<length>"`` (or ``btreenode:...``) as a ValueRef."""
  assert location.startswith(kind + ":"), location
  base, _, rest = location[len(kind) + 1 :].partition(":")
  relative, offset, length = rest.rsplit(":", 2)
  return _ocdbt.ValueRef(os.path.join(root, base + relative), int(offset), int(length))


def _dump_index(root):
  """The latest version's keys as TensorStore's dump gives them, and the tree's height."""
  kvstore = ts.KvStore.open({"driver": "file", "path": root + "/"}).result()
  latest = ts.ocdbt.dump(kvstore).result()["versions"][-1]
  location = latest["root"].get("location")
  pending = [(location, b"")] if location else []
  indirect, inline, nodes = {}, {}, set()
  while pending:
    location, prefix = pending.pop()
    nodes.add(_ref(root, location, "btreenode"))
    for entry in ts.ocdbt.dump(kvstore, location).result()["entries"]:
      if "location" in entry:  # interior: the child's keys are relative to its subtree's common prefix
        pending.append((entry["location"], prefix + _literal(entry["subtree_common_prefix"])))
      elif "indirect_value" in entry:
        indirect[prefix + _literal(entry["key"])] = _ref(root, entry["indirect_value"], "value")
      else:
        inline[prefix + _literal(entry["key"])] = _literal(entry["inline_value"])
  return indirect, inline, nodes, latest["root_height"]


def _check(root):
  """`read_index(root)` equals the dump, and its locations hold what TensorStore reads; returns the index."""
  index = _ocdbt.read_index(root)
  indirect, inline, nodes, _ = _dump_index(root)
  assert index.indirect == indirect
  assert index.inline == inline
  assert sorted(index.nodes, key=repr) == sorted(nodes, key=repr)
  assert len(index.nodes) == len(nodes)  # each node read once
  kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{root}/"}).result()
  assert sorted(kvstore.list().result()) == sorted([*index.indirect, *index.inline])
  reads = {key: kvstore.read(key) for key in [*index.indirect, *index.inline]}
  for key, ref in index.indirect.items():
    with open(ref.path, "rb") as f:
      f.seek(ref.offset)
      assert f.read(ref.length) == reads[key].result().value, key
  for key, value in index.inline.items():
    assert value == reads[key].result().value, key
  return index


# ---------------------------------------------------------------------------
# Databases: an Orbax checkpoint written by kckpt, and ones written by TensorStore
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orbax_item(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("orbax")
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1) as ckpt:
    state = {"params": {"w": jnp.arange(90_000, dtype=jnp.float32).reshape(300, 300), "b": jnp.ones(3)}, "step": jnp.int32(5)}
    ckpt.save(state, step=1)
    ckpt.wait_until_finished()
  return str(workdir / "checkpoints" / "ckpt_1" / "default")


def _tensorstore_database(root, compression):
  """Small nodes (interior nodes, height >= 1), inline and out-of-line values, and 40+ commits."""
  config = {"max_decoded_node_bytes": 1024, "max_inline_value_bytes": 64, "compression": compression}
  kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{root}/", "config": config}).result()
  for i in range(40):  # one commit each: more versions than the manifest holds inline
    kvstore.write(f"commit/{i:03d}".encode(), bytes([i]) * (10 if i % 2 else 200)).result()
  with ts.Transaction() as txn:
    for i in range(300):
      kvstore.with_transaction(txn).write(f"params.layer_{i // 30}.w/{i % 30}.0".encode(), bytes([i % 256]) * (i % 130))
  kvstore.delete_range(ts.KvStore.KeyRange(b"commit/005", b"commit/008")).result()  # the latest version lacks them
  kvstore.write(b"commit/010", b"overwritten").result()
  return root


@pytest.fixture(scope="module", params=[None, {"id": "zstd"}], ids=["uncompressed", "zstd"])
def tensorstore_db(request, tmp_path_factory):
  return _tensorstore_database(str(tmp_path_factory.mktemp("ts")), request.param)


# ---------------------------------------------------------------------------
# Agreement with TensorStore
# ---------------------------------------------------------------------------


def test_orbax_merged_database_points_into_the_process_folder(orbax_item):
  index = _check(orbax_item)
  w = index.indirect[b"params.w/0.0"]
  assert w == _ocdbt.ValueRef(w.path, 0, 360_000)
  assert os.path.dirname(os.path.dirname(w.path)) == os.path.join(orbax_item, "ocdbt.process_0")
  with open(w.path, "rb") as f:  # Zarr v2 chunk, no compressor: the array's raw bytes
    f.seek(w.offset)
    assert f.read(w.length) == np.arange(90_000, dtype=np.float32).tobytes()
  assert index.inline[b"step/0"] == np.int32(5).tobytes()
  assert index.inline[b"params.b/0"] == np.ones(3, np.float32).tobytes()
  # The merged database's own B-tree lives in the item folder, not in the process folder.
  assert [os.path.dirname(node.path) for node in index.nodes] == [os.path.join(orbax_item, "d")]


def test_orbax_process_database(orbax_item):
  process = os.path.join(orbax_item, "ocdbt.process_0")
  index = _check(process)
  assert index.indirect == _ocdbt.read_index(orbax_item).indirect
  assert all(os.path.dirname(node.path) == os.path.join(process, "d") for node in index.nodes)


def test_tensorstore_database_with_interior_nodes_and_a_version_tree(tensorstore_db):
  index = _check(tensorstore_db)
  kvstore = ts.KvStore.open({"driver": "file", "path": tensorstore_db + "/"}).result()
  manifest = ts.ocdbt.dump(kvstore).result()
  assert manifest["version_tree_nodes"], "older versions should be in version tree nodes"
  assert _dump_index(tensorstore_db)[3] >= 2  # a root, interior nodes and leaves
  assert len(index.nodes) > 20
  assert len(index.inline) > 50 and len(index.indirect) > 50
  assert b"commit/005" not in index.inline and b"commit/006" not in index.indirect  # deleted in the latest version
  assert index.inline[b"commit/010"] == b"overwritten"
  # The nodes really are compressed as configured (byte 13: the header's compression varint).
  with open(index.nodes[0].path, "rb") as f:
    f.seek(index.nodes[0].offset)
    header = f.read(14)
  assert header[13] == (0 if manifest["config"]["compression"] is None else 1)


def test_empty_database(tmp_path):
  kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}/"}).result()
  kvstore.write(b"a", b"1").result()
  kvstore.delete_range(ts.KvStore.KeyRange()).result()
  assert _ocdbt.read_index(str(tmp_path)) == _ocdbt.Index({}, {}, ())


# ---------------------------------------------------------------------------
# Damaged or unknown databases raise OcdbtFormatError, naming the file
# ---------------------------------------------------------------------------


@pytest.fixture
def uncompressed_db(tmp_path_factory, tmp_path):
  return _tensorstore_database(str(tmp_path / "db"), None)


def _patch_manifest(root, position, byte):
  """Sets one byte of the manifest and rewrites its CRC-32C: a well-formed manifest that says something else."""
  path = os.path.join(root, "manifest.ocdbt")
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[position] = byte
  data[-4:] = struct.pack("<I", crc32c.crc32c(bytes(data[:-4])))
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_missing_manifest(tmp_path):
  with pytest.raises(_ocdbt.OcdbtFormatError, match="manifest.ocdbt: missing") as raised:
    _ocdbt.read_index(str(tmp_path))
  assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_flipped_byte_in_the_manifest(uncompressed_db):
  path = os.path.join(uncompressed_db, "manifest.ocdbt")
  with open(path, "r+b") as f:
    f.seek(40)
    byte = f.read(1)
    f.seek(40)
    f.write(bytes([byte[0] ^ 0x10]))
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{path}: CRC-32C mismatch"):
    _ocdbt.read_index(uncompressed_db)


@pytest.mark.parametrize(
  "position,byte,message",
  [
    (0, 0x0D, "starts with 0ddb3a2a"),  # magic
    (12, 1, "format version 1"),
    (13, 7, "unknown compression 7"),
    (14 + 16, 1, "manifest kind 1"),  # numbered manifests (uncompressed body: uuid, then the kind)
  ],
)
def test_unknown_manifest(uncompressed_db, position, byte, message):
  path = _patch_manifest(uncompressed_db, position, byte)
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{path}: {message}"):
    _ocdbt.read_index(uncompressed_db)


def test_truncated_manifest(uncompressed_db):
  path = os.path.join(uncompressed_db, "manifest.ocdbt")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{path}: .* its header says"):
    _ocdbt.read_index(uncompressed_db)


def test_truncated_node_file(uncompressed_db):
  last = max(_ocdbt.read_index(uncompressed_db).nodes, key=lambda node: node.offset)
  with open(last.path, "r+b") as f:
    f.truncate(last.offset + last.length - 1)
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{last.path} at offset {last.offset}: .*truncated"):
    _ocdbt.read_index(uncompressed_db)


def test_damaged_node(uncompressed_db):
  node = _ocdbt.read_index(uncompressed_db).nodes[-1]
  with open(node.path, "r+b") as f:
    f.seek(node.offset + node.length // 2)
    byte = f.read(1)
    f.seek(node.offset + node.length // 2)
    f.write(bytes([byte[0] ^ 0x01]))
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{node.path} at offset {node.offset}: CRC-32C mismatch"):
    _ocdbt.read_index(uncompressed_db)


def test_missing_node_file(orbax_item, tmp_path):
  item = shutil.copytree(orbax_item, tmp_path / "item")
  (node,) = _ocdbt.read_index(str(item)).nodes
  os.remove(node.path)
  with pytest.raises(_ocdbt.OcdbtFormatError, match=f"{node.path}: B-tree node file unreadable"):
    _ocdbt.read_index(str(item))
