"""What a saved item holds, from its metadata alone: leaf paths, shapes, dtypes."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kckpt import _gc
from kckpt import trees
from kckpt._orbax import _format, _kvstore_specs
from kckpt._types import PyTree


def pytree_metadata(item_dir: epath.Path) -> PyTree:
  """The saved tree of an item, with Orbax metadata objects as leaves (what Orbax's `metadata().tree` returns).

  Built from the item's small metadata files (`_pytree_metadata_from_files`)
  when it can be; else by Orbax's `metadata()`, which opens every array.
  """
  item_dir = epath.Path(item_dir)
  with _gc.paused():  # a few objects per leaf: collections of the caller's heap would cost more than the read
    fast = _pytree_metadata_from_files(item_dir)
  return fast if fast is not None else ocp.PyTreeCheckpointHandler().metadata(item_dir).tree


def _internal_metadata(item_dir: epath.Path) -> Any:
  """Orbax's `InternalTreeMetadata` of the item, read from its ``_METADATA`` file (an Orbax internal; see `_reaches`)."""
  from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top

  impl = ocp.PyTreeCheckpointHandler()._handler_impl  # pylint: disable=protected-access
  return asyncio_utils.run_sync(impl._read_metadata_file(epath.Path(item_dir)))  # pylint: disable=protected-access


def _pytree_metadata_from_files(item_dir: epath.Path) -> PyTree | None:
  """`pytree_metadata` from ``_METADATA``, each array's Zarr JSON and ``_sharding``; None when unsure.

  Orbax's `metadata()` opens every array as a TensorStore and asks it for
  its spec (``to_json``): about 0.6 ms per leaf here, and TensorStore 0.1.86
  keeps a reference too many to what ``to_json`` returns, so each call grew
  the process by about 5 KB per leaf, for good (`Checkpointer.tree` of a
  step of 2000 leaves: 1.2 s and 11 MB per call). The leaves built here are
  the same objects with the same values (`ArrayMetadata` with its sharding
  and storage, `ScalarMetadata`, `StringMetadata`, empty values), from the
  files those TensorStores read. Anything unexpected (a value type other
  than arrays, scalars and strings, a Zarr JSON that does not parse) returns
  None, and the caller asks Orbax. One leniency: a jax.Array whose key is
  missing from an existing ``_sharding`` file gets no sharding (Orbax's
  `metadata()` raises NOT_FOUND for the whole tree).
  """
  # Orbax 0.12 internals (see `_reaches`): `InternalTreeMetadata.as_nested_tree` and its `ValueMetadataEntry`
  # leaves, `tree.utils.to_flat_dict`/`from_flat_dict` (as `as_custom_metadata` builds the tree), the leaves'
  # parameter names ('.'-joined keys), the `_sharding` file (base64 name -> serialized `ShardingMetadata`).
  from orbax.checkpoint._src.metadata import empty_values  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import sharding as sharding_metadata  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import value as value_metadata  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.tree import utils as tree_utils  # pylint: disable=g-import-not-at-top

  try:
    internal = _internal_metadata(item_dir)
    if not isinstance(internal.use_ocdbt, bool) or not isinstance(internal.use_zarr3, bool):
      return None
    nested = internal.as_nested_tree()
    flat = tree_utils.to_flat_dict(nested)
    kinds: dict[tuple[str, ...], str] = {}
    for keypath, entry in flat.items():
      value_type = entry.value_type
      if not isinstance(value_type, str) or not isinstance(entry.skip_deserialize, bool):
        return None
      if entry.skip_deserialize:
        kinds[keypath] = "empty" if empty_values.is_empty_typestr(value_type) else "other"
      elif value_type in (*_ZARR_ARRAY_TYPES, "scalar", "string"):
        kinds[keypath] = value_type
      else:
        return None
    zarrs = _zarr_jsons(
      item_dir,
      [".".join(k) for k, kind in kinds.items() if kind in (*_ZARR_ARRAY_TYPES, "scalar")],
      use_ocdbt=internal.use_ocdbt,
      use_zarr3=internal.use_zarr3,
    )
    if zarrs is None:
      return None
    shardings: dict[str, Any] = {}
    if "jax.Array" in kinds.values():
      try:
        shardings = json.loads((item_dir / SHARDING_FILE).read_text())
      except FileNotFoundError:  # Orbax: no file, no shardings
        pass
    leaves: dict[tuple[str, ...], Any] = {}
    for keypath, kind in kinds.items():
      name = ".".join(keypath)
      if kind == "empty":
        leaves[keypath] = empty_values.get_empty_value_from_typestr(flat[keypath].value_type, internal.pytree_metadata_options)
      elif kind == "other":
        leaves[keypath] = value_metadata.Metadata(name=name, directory=item_dir)
      elif kind == "string":
        leaves[keypath] = value_metadata.StringMetadata(name=name, directory=item_dir)
      else:
        zarr = zarrs[name]
        dtype = np.dtype(jax.numpy.dtype(zarr["data_type"] if internal.use_zarr3 else zarr["dtype"]))
        if kind == "scalar":
          leaves[keypath] = value_metadata.ScalarMetadata(name=name, directory=item_dir, dtype=dtype)
          continue
        serialized = shardings.get(base64.urlsafe_b64encode(name.encode()).decode()) if kind == "jax.Array" else None
        leaves[keypath] = value_metadata.ArrayMetadata(
          name=name,
          directory=item_dir,
          shape=tuple(int(d) for d in zarr["shape"]),
          dtype=dtype,
          sharding=sharding_metadata.from_serialized_string(serialized) if serialized else None,
          storage=value_metadata.StorageMetadata(
            chunk_shape=_read_chunk_shape(zarr, use_zarr3=internal.use_zarr3),
            write_shape=flat[keypath].write_shape,
            zarr_metadata=value_metadata.ZarrMetadata.from_json(zarr),
          ),
        )
    return tree_utils.from_flat_dict(leaves, target=nested)
  except Exception as e:  # pylint: disable=broad-exception-caught  # anything unexpected: Orbax's metadata() decides
    logging.getLogger("kckpt").debug("kckpt: %s metadata read through Orbax's metadata(): %r", item_dir, e)
    return None


def _read_chunk_shape(zarr: Mapping[str, Any], *, use_zarr3: bool) -> tuple[int, ...]:
  """The shape of the chunks a read of the array fetches (TensorStore's ``read_chunk_template``)."""
  if not use_zarr3:
    return tuple(int(d) for d in zarr["chunks"])
  for codec in zarr.get("codecs", ()):
    if codec.get("name") == "sharding_indexed":  # chunks inside each stored shard
      return tuple(int(d) for d in codec["configuration"]["chunk_shape"])
  return tuple(int(d) for d in zarr["chunk_grid"]["configuration"]["chunk_shape"])


def _zarr_jsons(item_dir: epath.Path, names: list[str], *, use_ocdbt: bool, use_zarr3: bool) -> dict[str, Any] | None:
  """Parameter name -> its array's Zarr JSON (``.zarray`` or ``zarr.json``), all read at once; None if one is missing."""
  if not names:
    return {}
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top

  _kvstore_specs.install()  # Orbax's builder resolves the folder's spec through TensorStore's leaking `to_json`
  spec = ts_utils.build_kvstore_tspec(str(item_dir), use_ocdbt=use_ocdbt)
  if not use_ocdbt:  # a plain kvstore: keys are relative to a folder path ending in '/'
    spec = {**spec, "path": spec["path"].rstrip("/") + "/"}
  kvstore = ts.KvStore.open(spec, context=ocp.serialization.get_ts_context(use_ocdbt=use_ocdbt)).result()
  suffix = "zarr.json" if use_zarr3 else ".zarray"
  reads = {name: kvstore.read(f"{name}/{suffix}") for name in names}
  out = {}
  for name, future in reads.items():
    result = future.result()
    if result.state != "value":
      return None
    out[name] = json.loads(bytes(result.value))
  return out


def as_saved_restore_args(item_dir: epath.Path) -> PyTree | None:
  """Orbax restore arguments that read the item as saved (arrays as NumPy, scalars and strings as Python); None when unsure.

  Built from the item's ``_METADATA`` file alone. Orbax's `metadata()` (the
  fallback) opens every array, and TensorStore 0.1.86's ``to_json``, which it
  calls per array, keeps a reference too many to each key and value it
  returns: a process that restored a step of 9001 leaves without a target
  grew by about 50 MB per restore, for good. The values read are the same:
  with no dtype given, Orbax reads each array and scalar as stored, and a
  scalar as the Python number of its stored dtype.
  """
  # Orbax 0.12 internal: the handler's `_read_metadata_file` and `InternalTreeMetadata.as_nested_tree`, whose
  # leaves are `ValueMetadataEntry`s (value_type, skip_deserialize); see `_reaches`.
  from orbax.checkpoint._src.metadata import empty_values  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import value_metadata_entry  # pylint: disable=g-import-not-at-top

  try:
    internal = _internal_metadata(item_dir)
    nested = internal.as_nested_tree()
    options = internal.pytree_metadata_options
  except Exception as e:  # pylint: disable=broad-exception-caught  # anything unexpected: Orbax's metadata() decides
    logging.getLogger("kckpt").debug("kckpt: %s read through Orbax's metadata(): %r", item_dir, e)
    return None
  unknown: list[str] = []

  def args_for(entry: Any) -> Any:
    value_type = getattr(entry, "value_type", None)
    if not isinstance(value_type, str):
      unknown.append(repr(entry))
      return None
    if entry.skip_deserialize:
      if empty_values.is_empty_typestr(value_type):
        return empty_values.get_empty_value_from_typestr(value_type, options)
      unknown.append(value_type)
      return None
    if value_type in _ZARR_ARRAY_TYPES:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    if value_type == "string":
      return ocp.RestoreArgs(restore_type=str)
    if value_type == "scalar":
      return ocp.RestoreArgs()
    unknown.append(value_type)
    return None

  tree = jax.tree.map(args_for, nested, is_leaf=lambda x: isinstance(x, value_metadata_entry.ValueMetadataEntry))
  if unknown:
    logging.getLogger("kckpt").debug("kckpt: %s read through Orbax's metadata(): value types %s", item_dir, unknown[:3])
    return None
  return tree


def saved_leaf_specs(item_dir: epath.Path) -> dict[str, trees.LeafSpec]:
  """Path -> shape and dtype of every saved leaf of the item at `item_dir`."""
  fast = _leaf_specs_from_zarr_metadata(item_dir)
  return fast if fast is not None else _leaf_specs_from_orbax_metadata(item_dir)


def _leaf_specs_from_orbax_metadata(item_dir: epath.Path, metadata: PyTree = None) -> dict[str, trees.LeafSpec]:
  specs = {}
  if metadata is None:
    metadata = pytree_metadata(item_dir)
  for path, meta in trees.flatten_with_paths(metadata).items():
    dtype = getattr(meta, "dtype", None)
    shape = getattr(meta, "shape", None)
    is_array = type(meta).__name__ == "ArrayMetadata"
    specs[path] = trees.LeafSpec(
      tuple(shape) if shape is not None else (),
      np.dtype(dtype) if (dtype is not None and is_array) else None,
    )
  return specs


def metadata_as_shape_dtype(item_dir: epath.Path, *, unescape: bool = False) -> PyTree:
  """The saved tree with `jax.ShapeDtypeStruct` leaves (no array is read); `unescape`: its keys were escaped."""

  def convert(meta):
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", None)
    if shape is None or dtype is None:
      return meta
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))

  tree = jax.tree.map(convert, pytree_metadata(item_dir))
  return trees.unescape_dotted_keys(tree) if unescape else tree


# ---------------------------------------------------------------------------
# Reading leaf shapes and dtypes fast
# ---------------------------------------------------------------------------

_ZARR_ARRAY_TYPES = ("jax.Array", "np.ndarray")
_NO_SHAPE_TYPES = ("scalar", "string")
_EMPTY_NODE_TYPES = ("None", "Dict", "List", "Tuple", "NamedTuple")  # no leaf in the tree


def _leaf_specs_from_zarr_metadata(item_dir: epath.Path) -> dict[str, trees.LeafSpec] | None:
  """`saved_leaf_specs` from the item's small metadata files only; None when unsure.

  Orbax's `PyTreeCheckpointHandler.metadata` opens every array as a
  TensorStore (about 1 ms per leaf here: 0.5 s for 512 leaves, a third of
  restoring them), where the shapes and dtypes are in one small Zarr JSON per
  array. This reads the tree from ``_METADATA`` and all Zarr JSONs at once
  from one key-value store (OCDBT or plain files). Anything unexpected (a
  value type other than arrays, scalars, strings and empty nodes, a missing
  key, an unknown format)
  returns None and the caller asks Orbax.
  """
  # Orbax 0.12 internal: the layout of ``_METADATA`` (tree_metadata with
  # key_metadata / value_metadata.value_type, use_ocdbt, use_zarr3), the
  # parameter names ('.'-joined keys), and ts_utils' kvstore spec builder.
  try:
    meta_file = item_dir / _format.ITEM_METADATA_FILE
    if not meta_file.exists():
      return None
    meta = json.loads(meta_file.read_text())
    tree_meta = meta["tree_metadata"]
    use_ocdbt, use_zarr3 = meta.get("use_ocdbt"), meta.get("use_zarr3")
    if not isinstance(use_ocdbt, bool) or not isinstance(use_zarr3, bool):
      return None
    leaves: dict[str, str] = {}
    for entry in tree_meta.values():
      keys = [str(k["key"]) for k in entry["key_metadata"]]
      value_type = entry["value_metadata"]["value_type"]
      if value_type in _EMPTY_NODE_TYPES:
        continue
      if value_type not in (*_ZARR_ARRAY_TYPES, *_NO_SHAPE_TYPES) or not keys:
        return None
      leaves[".".join(keys)] = value_type
    specs = {name: trees.LeafSpec((), None) for name, t in leaves.items() if t in _NO_SHAPE_TYPES}
    arrays = [name for name, t in leaves.items() if t in _ZARR_ARRAY_TYPES]
    zarrs = _zarr_jsons(item_dir, arrays, use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    if zarrs is None:
      return None
    for name, zarr in zarrs.items():
      dtype = zarr["data_type"] if use_zarr3 else zarr["dtype"]
      if not isinstance(dtype, str):
        return None
      specs[name] = trees.LeafSpec(tuple(int(d) for d in zarr["shape"]), np.dtype(jax.numpy.dtype(dtype)))
    return specs
  except Exception:  # pylint: disable=broad-exception-caught
    return None


_LEAF_KINDS = {"ArrayMetadata": "array", "ScalarMetadata": "scalar", "StringMetadata": "string"}


@dataclasses.dataclass(frozen=True)
class SavedLeaf:
  """One saved leaf as the item's metadata describes it (no data read).

  Attributes:
    path: dotted pytree path (``params.dense.w``).
    kind: ``"array"``, ``"scalar"`` or ``"string"`` (Orbax's metadata type
      name for anything else).
    shape: the shape (``()`` for a scalar; None when unknown, e.g. a string).
    dtype: the dtype (None when unknown).
  """

  path: str
  kind: str
  shape: tuple[int, ...] | None
  dtype: np.dtype | None

  @property
  def nbytes(self) -> int | None:
    """Bytes of the leaf in memory (None for strings and unknown leaves)."""
    if self.shape is None or self.dtype is None:
      return None
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def saved_leaf(path: str, meta: Any) -> SavedLeaf:
  kind = _LEAF_KINDS.get(type(meta).__name__, type(meta).__name__)
  shape = getattr(meta, "shape", None)
  dtype = getattr(meta, "dtype", None)
  return SavedLeaf(
    path=path,
    kind=kind,
    shape=tuple(shape) if shape is not None else None,
    dtype=np.dtype(dtype) if dtype is not None else None,
  )


SHARDING_FILE = "_sharding"  # in a pytree item's folder: base64(leaf name) -> JSON of its sharding (JAX arrays only)


def read_shardings(item_dir: epath.Path) -> dict[str, str]:
  """Leaf name -> a short description of the sharding it was saved with; {} without Orbax's ``_sharding`` file.

  ``"cpu:0"`` for one device; ``"mesh(data=2, model=4) P('data', None)"`` for a
  `NamedSharding`; the type's name otherwise. NumPy leaves have none.
  """
  try:
    raw = json.loads((item_dir / SHARDING_FILE).read_text())
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
    return {}
  out: dict[str, str] = {}
  for key, value in raw.items() if isinstance(raw, dict) else ():
    try:
      name = base64.urlsafe_b64decode(key.encode()).decode()
      out[name] = describe_sharding(json.loads(value) if isinstance(value, str) else value)
    except (ValueError, TypeError):
      continue
  return out


def describe_sharding(saved: Mapping[str, Any]) -> str:
  """A short description of one sharding as Orbax records it.

  >>> describe_sharding({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
  'cpu:0'
  >>> describe_sharding({"sharding_type": "NamedSharding", "shape": [2, 4], "axis_names": ["data", "model"],
  ...                    "partition_spec": ["data", None]})
  "mesh(data=2, model=4) P('data', None)"
  """
  kind = str(saved.get("sharding_type", "?"))
  if kind == "SingleDeviceSharding":
    return str(saved.get("device_str", "one device"))
  if kind == "NamedSharding":
    mesh = ", ".join(f"{n}={s}" for n, s in zip(saved.get("axis_names", []), saved.get("shape", []), strict=False))
    spec = ", ".join(repr(tuple(p)) if isinstance(p, list) else repr(p) for p in saved.get("partition_spec", []))
    return f"mesh({mesh}) P({spec})"
  return kind
