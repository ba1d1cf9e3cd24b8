"""Reading pytree and JSON items of a finished step: into a target, as saved, or a few leaves at a time."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kckpt import _gc
from kckpt import storage as storage_lib
from kckpt import trees
from kckpt._orbax import _drain, _handlers, _inflight, _kvstore_specs, _metadata, _read_checks, _read_progress
from kckpt._types import PyTree
from kckpt.errors import LeafReadError

_READ_ERROR_TYPES = (OSError, ValueError, RuntimeError, KeyError, LeafReadError)


def is_read_error(error: BaseException) -> bool:
  """Whether `error` is what reading a missing, truncated or undecodable file raises through Orbax.

  That is FileNotFoundError, TensorStore's ValueError, JaxRuntimeError... and
  the bare `Exception` Orbax 0.12 wraps TensorStore errors in ("Encountered
  error while reading array index"). Anything else (a TypeError,
  AttributeError...) is a bug in kckpt or in the caller's item, never reported
  as a damaged checkpoint.
  """
  return isinstance(error, _READ_ERROR_TYPES) or type(error) is Exception  # pylint: disable=unidiomatic-typecheck


@dataclasses.dataclass(frozen=True)
class ItemRead:
  """One item to read as saved: NumPy arrays and Python scalars, or its JSON value."""

  name: str
  format: str


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def abstract_target(tree: PyTree) -> PyTree:
  """The target with each `jax.Array` replaced by its shape, dtype and sharding.

  Taken before the target is donated: the restore then needs none of its data.
  """

  def convert(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_default_sharding())
    if isinstance(leaf, np.generic):  # Orbax restores NumPy scalars as 0-d arrays
      return np.asarray(leaf)
    return leaf

  return jax.tree.map(convert, tree)


def match_scalar_types(target: PyTree, restored: PyTree) -> PyTree:
  """Gives NumPy-scalar leaves of `target` back their type (e.g. `np.int32`)."""

  def convert(wanted, value):
    return type(wanted)(value) if isinstance(wanted, np.generic) else value

  return jax.tree.map(convert, target, restored)


def _restore_args(read: ItemRead, item_dir: epath.Path) -> ocp.args.CheckpointArgs:
  if read.format == "json":
    return ocp.args.JsonRestore()
  # As saved: NumPy arrays, Python scalars, strings (restores into a target use read_tree_into).
  as_saved = _metadata.as_saved_restore_args(item_dir)
  if as_saved is None:
    as_saved = jax.tree.map(_as_saved_restore_args, _metadata.pytree_metadata(item_dir))
  return ocp.args.PyTreeRestore(item=None, restore_args=as_saved)


def _as_saved_restore_args(meta: Any) -> ocp.RestoreArgs:
  """Restore arguments for one saved leaf with no target: arrays as NumPy, scalars and strings as Python."""
  if type(meta).__name__ == "ArrayMetadata":
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=getattr(meta, "dtype", None))
  return ocp.checkpoint_utils.construct_restore_args(meta)


def read_leaves(item_dir: epath.Path, wanted: Mapping[str, Any], metadata: PyTree = None) -> dict[str, Any]:
  """Reads only the leaves at the paths of `wanted` from one pytree item.

  `wanted` maps a saved leaf's path to its abstract target (a
  `jax.ShapeDtypeStruct` with a sharding, a NumPy array for a host array, a
  Python scalar) or to None (read as saved, as NumPy). Every other leaf is an
  Orbax placeholder and is not read.
  """

  def select(keypath, meta):
    path = trees.path_str(keypath)
    if path not in wanted:
      return ocp.PLACEHOLDER
    target = wanted[path]
    # No target: the saved metadata, from which Orbax restores arrays as NumPy,
    # scalars as Python numbers and strings as str.
    return meta if target is None else target

  if metadata is None:
    metadata = _metadata.pytree_metadata(item_dir)
  item = jax.tree_util.tree_map_with_path(select, metadata)

  def args_for(keypath, leaf):
    if trees.path_str(keypath) in wanted and wanted[trees.path_str(keypath)] is None:
      return _as_saved_restore_args(leaf)
    return ocp.checkpoint_utils.construct_restore_args(leaf)

  restore_args = jax.tree_util.tree_map_with_path(args_for, item)
  _read_progress.install()  # the shard reader that refuses to start once a read of its call failed (`_drain`)
  _kvstore_specs.install()  # each array's kvstore spec without TensorStore's leaking `to_json`
  with (
    _gc.paused(),
    _drain.drained(),
    _read_checks.checking(epath.Path(item_dir).parent),
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader,
  ):
    restored = reader.restore(item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  return {path: leaf for path, leaf in trees.flatten_with_paths(restored).items() if path in wanted}


# Bytes read at once by a restore into a target (below) and by the `kckpt`
# command reading a few leaves at a time (`kckpt.inspect.leaf_batches`).
RESTORE_BATCH_BYTES = 128 * 2**20

# A restore into a target reads its leaves in batches of about RESTORE_BATCH_BYTES
# (one Orbax call each), which bounds the transient host buffers (measured: a
# donated GPT-2 restore grows peak memory by 32-34% of the state, 59-61% in one
# call). But Orbax re-reads and rebuilds the whole tree's metadata on every
# call, about 0.3 ms per leaf per call here: a 9001-leaf state in 10 batches
# took 49-66 s, in one call 29 s. So the batches are merged until the leaves
# walked over all calls are at most RESTORE_TREE_VISITS (about 3 s).
RESTORE_TREE_VISITS = 10_000

# Orbax's byte limiter is left at its default unless the user sets one: it
# wakes every waiting read on each release, so a 9001-leaf restore with a
# 128 MiB limit spent 45 of 70 s in it. kckpt bounds the bytes read at once
# with its own limit instead (`_inflight`), which lets the reads through in
# order: a 32nd of the state, at least RESTORE_INFLIGHT_MIN_BYTES (a donated
# restore of the 9001-leaf, 1.21 GB deep state grew peak memory by 57-65%
# of the state unbounded; 26-28% at 128 MiB, 24-25% at 64 MiB, 22-23% at
# 32 MiB; about 20% is memory Orbax and TensorStore keep per leaf).
RESTORE_INFLIGHT_MIN_BYTES = 32 * 2**20


def restore_inflight_bytes(total: int) -> int:
  """The most bytes of shards a restore of `total` bytes into a target reads at once.

  >>> restore_inflight_bytes(2**30) // 2**20, restore_inflight_bytes(16 * 2**30) // 2**20
  (32, 512)
  """
  return max(RESTORE_INFLIGHT_MIN_BYTES, total // 32)


def restore_batches(sizes: Mapping[str, int]) -> list[list[str]]:
  """The leaves of one restore (path -> bytes, in the tree's order), grouped into the batches read one Orbax call each.

  >>> restore_batches({"a": 100 * 2**20, "b": 100 * 2**20, "c": 10})
  [['a', 'b'], ['c']]
  >>> len(restore_batches({f"w{i}": 2**20 for i in range(9000)}))  # many leaves: one call
  1
  """
  calls = max(1, RESTORE_TREE_VISITS // max(1, len(sizes)))
  limit = max(RESTORE_BATCH_BYTES, -(-sum(sizes.values()) // calls))
  batches: list[list[str]] = [[]]
  size = 0
  for path, nbytes in sizes.items():
    if batches[-1] and size >= limit:
      batches.append([])
      size = 0
    batches[-1].append(path)
    size += nbytes
  return [b for b in batches if b]


def _read_handler(storage: storage_lib.StorageOptions | None) -> ocp.PyTreeCheckpointHandler:
  # The format is read from the checkpoint; of `storage`, only the read concurrency is used.
  return _handlers.pytree_handler(storage or storage_lib.StorageOptions(), None)


def _array_nbytes(leaf: Any) -> int:
  """Bytes of one target array leaf (0 for NumPy leaves and scalars, which Orbax reads without its limiter)."""
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if getattr(leaf, "sharding", None) is None or shape is None or dtype is None:
    return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:  # an extended dtype (PRNG keys): its own itemsize when it has one
    itemsize = int(getattr(dtype, "itemsize", 8) or 8)
  return int(np.prod(shape, dtype=np.int64)) * itemsize


_LIMITER_REFUSED = "Requested more bytes than we reserved"  # Orbax's limiter, when one read exceeds it


def read_storage(storage: storage_lib.StorageOptions | None, leaves: Mapping[str, Any]) -> storage_lib.StorageOptions:
  """The options of one restore into a target whose leaves are `leaves` (dotted path -> leaf).

  A `restore_concurrent_gb` the user set that the largest array does not fit
  raises here, naming the leaf, before anything is read or donated: Orbax
  reserves, for each shard it reads, the bytes of the saved chunks the shard
  touches (for a target sharded otherwise than the save, up to the whole
  array), and refuses a reservation at least its limit.
  """
  storage = storage or storage_lib.StorageOptions()
  if storage.restore_concurrent_gb is None:
    return storage
  sizes = {path: _array_nbytes(leaf) for path, leaf in leaves.items()}
  path, largest = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
  if largest >= storage.restore_concurrent_gb * 1e9:
    raise ValueError(
      f"StorageOptions(restore_concurrent_gb={storage.restore_concurrent_gb}) is too small for leaf {path!r}"
      f" ({largest} bytes): Orbax may read a whole array at once, so the limit must exceed the largest one."
      " Nothing was read or freed."
    )
  return storage


def read_tree_into(
  item_dir: epath.Path,
  target: PyTree,
  *,
  donate: bool,
  storage: storage_lib.StorageOptions | None = None,
  on_batch: Callable[[int, int], None] | None = None,
) -> PyTree:
  """Restores the pytree item at `item_dir` into the structure of `target`.

  The target must match the saved tree (checked by the caller). Leaves are
  read in the batches of `restore_batches` (the other leaves of the target
  are Orbax placeholders); with `donate`, the target's arrays are all freed
  first (checked first: `read_storage` raises before anything is freed).
  At most `restore_inflight_bytes` of shards are read at once.
  `on_batch(bytes, leaves)` is called with the bytes of each shard as it is
  read, and with the leaves of each batch once it is read.
  """
  leaves = trees.flatten_with_paths(target)
  abstract = abstract_target(target)
  flat = trees.flatten_with_paths(abstract)
  handler = _read_handler(read_storage(storage, flat))
  sizes = {p: trees.tree_nbytes(leaf) for p, leaf in leaves.items()}
  batches = restore_batches(sizes)
  reported = [0]

  def on_bytes(nbytes: int) -> None:
    reported[0] += nbytes
    if on_batch is not None:
      on_batch(nbytes, 0)

  scope = contextlib.ExitStack()
  scope.callback(handler.close)
  restored: dict[str, Any] = {}
  with scope:
    try:  # before anything is freed: a step that lost its checksums is refused with the target intact
      scope.enter_context(_read_checks.checking(epath.Path(item_dir).parent))
    except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
      if not is_read_error(e):
        raise
      raise LeafReadError(["<checksums>"], e) from e
    scope.enter_context(_gc.paused())
    scope.enter_context(_drain.drained())
    _read_progress.install()  # the shard reader that waits for room (and reports progress)
    _kvstore_specs.install()  # (see `read_leaves`)
    scope.enter_context(_inflight.limiting(restore_inflight_bytes(sum(sizes.values()))))
    if donate:
      release(list(leaves.values()))
    for batch in batches:
      wanted = set(batch)
      item = (
        abstract
        if len(batches) == 1
        else jax.tree_util.tree_map_with_path(
          lambda kp, leaf, wanted=wanted: leaf if trees.path_str(kp) in wanted else ocp.PLACEHOLDER, abstract
        )
      )
      reported[0] = 0
      try:
        with _read_progress.reporting(on_bytes if on_batch is not None else None):
          out = handler.restore(
            epath.Path(item_dir),  # Orbax branches on isinstance(path, epath.Path)
            args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
          )
      except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
        if _LIMITER_REFUSED in str(e) or _LIMITER_REFUSED in str(e.__cause__ or ""):
          raise ValueError(
            f"Orbax refused to read an array of {item_dir} within restore_concurrent_gb: {e}. Raise"
            " StorageOptions.restore_concurrent_gb (or leave it None); the checkpoint is intact."
          ) from e
        if not is_read_error(e):
          raise
        raise LeafReadError(_unreadable_leaves(item_dir, batch, flat), e) from e
      _read_checks.forget_unread(epath.Path(item_dir).parent)
      restored.update({p: v for p, v in trees.flatten_with_paths(out).items() if p in wanted})
      if on_batch is not None:
        on_batch(max(0, sum(trees.tree_nbytes(leaves[p]) for p in batch) - reported[0]), len(batch))
  return trees.replace_leaves(target, restored)


def read_each(
  read: Callable[[list[str]], dict[str, Any]], paths: Sequence[str]
) -> tuple[dict[str, Any], dict[str, BaseException]]:
  """Reads `paths` in one call; when that fails, one by one, to name the leaves at fault.

  Returns the values read and, for each leaf that could not be read, its error
  (only the errors of a damaged checkpoint, `is_read_error`; others propagate).
  """
  try:
    return read(list(paths)), {}
  except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
    if not is_read_error(e):
      raise
  values: dict[str, Any] = {}
  faults: dict[str, BaseException] = {}
  for path in paths:
    try:
      values.update(read([path]))
    except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
      if not is_read_error(e):
        raise
      faults[path] = e
  return values, faults


def _unreadable_leaves(item_dir: epath.Path, paths: Sequence[str], abstract: Mapping[str, Any]) -> list[str]:
  """On the error path only: the leaves of `paths` that cannot be read."""
  try:
    metadata = _metadata.pytree_metadata(item_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
    if not is_read_error(e):
      raise
    return list(paths)
  # In groups of about RESTORE_BATCH_BYTES, then leaf by leaf inside a group that fails: each Orbax
  # call rebuilds the whole tree's metadata, so one call per leaf of a big tree would take hours.
  groups: list[list[str]] = [[]]
  size = 0
  for path in paths:
    if groups[-1] and size >= RESTORE_BATCH_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(path)
    size += trees.tree_nbytes(abstract[path])
  faults: dict[str, BaseException] = {}
  for group in groups:
    found = read_each(lambda ps: read_leaves(item_dir, {p: abstract[p] for p in ps}, metadata=metadata), group)[1]
    if found:  # a failed Orbax call leaves cycles that hold arrays read; the collector is paused (`_gc`)
      gc.collect()
    faults.update(found)
  return sorted(faults) or list(paths)


def read_items(
  step_path: epath.Path, reads: Sequence[ItemRead], storage: storage_lib.StorageOptions | None = None
) -> dict[str, Any]:
  """Reads the named items of the finished step at `step_path`; only those.

  The format (OCDBT, Zarr version, compression) is read from the checkpoint;
  of `storage`, only the read concurrency limit is used.
  """
  args = ocp.args.Composite(**{r.name: _restore_args(r, step_path / r.name) for r in reads})
  registry = _handlers.handler_registry(storage, None) if storage is not None else None
  _read_progress.install()  # (see `read_leaves`)
  _kvstore_specs.install()
  with (
    _gc.paused(),
    _drain.drained(),
    _read_checks.checking(step_path),
    ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry)) as reader,
  ):
    restored = reader.restore(step_path, args=args)
  return {r.name: restored[r.name] for r in reads}


def release(tree: PyTree) -> None:
  """Frees the device memory of every `jax.Array` in `tree` (donation).

  On CPU that memory is the process's heap, and glibc keeps most of the freed
  pages for later allocations in the same arena, which the read's threads do
  not use: a donated restore of 9001 small leaves then grew peak RSS by
  109-114% of the state. Handing the free pages back to the OS right away
  (``malloc_trim``) made it 61-62%, for 0.10-0.14 s on a 10-15 s restore.
  """
  on_cpu = False
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      on_cpu = on_cpu or any(d.platform == "cpu" for d in leaf.devices())
      leaf.delete()
  if on_cpu:
    _trim_heap()


@functools.cache
def _malloc_trim() -> Any:
  """glibc's ``malloc_trim``, or None (another C library, or no shared libc)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


def _trim_heap() -> None:
  """Returns the free pages of the C heap to the OS, where the C library can (glibc)."""
  if (trim := _malloc_trim()) is not None:
    trim(0)


# ---------------------------------------------------------------------------
# Reading a few leaves at a time (the `kckpt` command: tree, diff, verify, export)
# ---------------------------------------------------------------------------


class LeafReader:
  """Reads the leaves of one saved pytree item, a few at a time.

  Orbax is asked for the named leaves only (every other leaf is a
  `PLACEHOLDER`, which Orbax skips), so memory holds what one `read` returns,
  never the whole tree. Arrays are read as NumPy arrays, scalars and strings
  as Python values. Never writes.

  Attributes:
    item_dir: the item's folder (``.../ckpt_10/params``).
    leaves: dotted path -> `SavedLeaf`, in the tree's order.
  """

  def __init__(self, item_dir: epath.Path):
    self.item_dir = epath.Path(item_dir)
    self._template = _metadata.pytree_metadata(self.item_dir)
    self._keypaths: dict[str, tuple[Any, ...]] = {}
    self.leaves: dict[str, _metadata.SavedLeaf] = {}
    for keypath, meta in jax.tree_util.tree_flatten_with_path(self._template)[0]:
      path = trees.path_str(keypath)
      self._keypaths[path] = keypath
      self.leaves[path] = _metadata.saved_leaf(path, meta)

  def read(self, paths: Sequence[str]) -> dict[str, Any]:
    """Reads the leaves at `paths` (dotted paths of `leaves`); only those."""
    return read_leaves(self.item_dir, {p: None for p in paths}, metadata=self._template) if paths else {}

  def rebuild(self, values: Mapping[str, Any], *, top_level_key: str | None = None) -> PyTree:
    """The saved tree (or its `top_level_key` subtree) with `values` as leaves.

    `values` maps dotted paths to leaves and must hold every leaf of the
    (sub)tree.
    """
    template = self._template
    prefix: tuple[Any, ...] = ()
    if top_level_key is not None:
      template = template[top_level_key]
      prefix = (jax.tree_util.DictKey(top_level_key),)
    return jax.tree_util.tree_map_with_path(lambda keypath, _: values[trees.path_str(prefix + keypath)], template)

  def top_level_keys(self) -> list[str]:
    """The keys of the saved tree's top level when it is a dict (else empty)."""
    return [str(k) for k in self._template] if isinstance(self._template, Mapping) else []
