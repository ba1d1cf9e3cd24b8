"""The one module that builds Orbax objects: managers, options, handlers and args.

Everything kckpt asks of Orbax goes through here, so an Orbax upgrade is
checked in one place. Internals of Orbax that are used are marked
``# Orbax 0.12 internal:`` with the reason.

Writes go through an Orbax `CheckpointManager` (async saving, the atomic
temporary-folder protocol, multi-process barriers, deleting old steps). Reads
use a stand-alone `Checkpointer` on the step folder: a reader never needs a
manager, never writes, and avoids the manager's single-item mode (which
rejects `Composite` args once it sees a ``default/`` folder).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kckpt import cloud
from kckpt import steps as steps_lib
from kckpt import storage as storage_lib
from kckpt import trees
from kckpt._types import Metrics, PyTree, Step
from kckpt.errors import BackgroundSaveError
from orbax.checkpoint._src.path import atomicity as _atomicity  # Orbax 0.12 internal: see DurableRenameTemporaryPath
from orbax.checkpoint._src.path import gcs_utils as _gcs_utils  # Orbax 0.12 internal: see _install_s3_support
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils  # Orbax 0.12 internal: see _install_s3_support

MultiprocessingOptions = ocp.options.MultiprocessingOptions


class _DropNoMetricsWarning(logging.Filter):
  """Orbax warns on every save without metrics once metrics are tracked.

  kckpt tracks metrics whenever they are given (so they are stored with each
  step) and saving without them is normal, so the warning is noise.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Requested `tracked_metric`")


logging.getLogger("absl").addFilter(_DropNoMetricsWarning())


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ItemWrite:
  name: str
  format: str  # "pytree" | "json"
  value: Any


class _Preservation:
  """Orbax `PreservationPolicy` that asks kckpt's retention rules.

  `decide(steps)` gets the steps the manager knows (sorted, the one being
  saved last) and returns, for each, whether it stays.
  """

  def __init__(self, decide: Callable[[Sequence[Step]], Sequence[bool]]):
    self._decide = decide

  def should_preserve(self, checkpoints, *, context) -> Sequence[bool]:
    del context
    return list(self._decide([c.step for c in checkpoints]))


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


# ---------------------------------------------------------------------------
# s3:// support (Orbax 0.12.8 internals)
# ---------------------------------------------------------------------------
#
# Orbax 0.12.8 builds TensorStore kvstore specs in
# `orbax.checkpoint._src.serialization.tensorstore_utils`
# (`_build_ocdbt_kvstore_tspec`, `_build_non_ocdbt_kvstore_tspec`). It knows
# only gs:// as a remote scheme: `_normalize_path` runs `os.path.normpath`,
# which turns ``s3://b/k`` into ``s3:/b/k``, and then, as the path is not
# absolute, raises "Checkpoint path should be absolute. Got s3:/b/k" (S3 is an
# open Orbax request, #359). TensorStore itself has an ``s3`` kvstore driver
# (OCDBT on top of it works), so kckpt hooks three module-level functions,
# each changed for s3:// paths only (every other path goes to Orbax's own code):
#
# - `tensorstore_utils._normalize_path`: keeps the ``s3://`` of a path;
# - `tensorstore_utils._use_gcs_driver`: says "object store" for s3:// too, so
#   the spec builders take their remote branch, which calls
# - `gcs_utils.get_kvstore_for_gcs`: returns TensorStore's ``s3`` spec
#   (bucket, path, ``endpoint``, ``aws_region`` from `kckpt.cloud`).
#
# Finishing: on S3 a rename is a copy, so an s3:// `Writer` passes Orbax's own
# `CommitFileTemporaryPath` (what Orbax picks for gs://): the step is written
# in place and ``commit_success.txt`` is written last; kckpt's listing counts
# only steps that have it. Checked against orbax-checkpoint 0.12.8; the
# pyproject pin (<0.13) keeps an upgrade from silently changing these.

_ORIGINAL_NORMALIZE_PATH = _ts_utils._normalize_path  # pylint: disable=protected-access
_ORIGINAL_USE_GCS_DRIVER = _ts_utils._use_gcs_driver  # pylint: disable=protected-access
_ORIGINAL_GET_KVSTORE_FOR_GCS = _gcs_utils.get_kvstore_for_gcs


def _normalize_path(path: str) -> str:
  if cloud.is_s3(path):
    return cloud.S3_SCHEME + os.path.normpath(path[len(cloud.S3_SCHEME) :])
  return _ORIGINAL_NORMALIZE_PATH(path)


def _use_gcs_driver(directory: str) -> bool:
  return cloud.is_s3(directory) or _ORIGINAL_USE_GCS_DRIVER(directory)


def _get_kvstore(path: str) -> dict[str, Any]:
  if cloud.is_s3(path):
    return cloud.s3_kvstore_spec(path)
  return _ORIGINAL_GET_KVSTORE_FOR_GCS(path)


def _install_s3_support() -> None:
  """Makes Orbax 0.12.8 write and read s3:// paths through TensorStore's ``s3`` driver."""
  _ts_utils._normalize_path = _normalize_path  # pylint: disable=protected-access
  _ts_utils._use_gcs_driver = _use_gcs_driver  # pylint: disable=protected-access
  _gcs_utils.get_kvstore_for_gcs = _get_kvstore


_install_s3_support()


def _temporary_path_class(directory: epath.Path, durable: bool) -> type | None:
  """How a step is finished: durable rename locally, commit file on S3, Orbax's choice otherwise (gs://)."""
  if _is_local(directory):
    return DurableRenameTemporaryPath if durable else None
  if cloud.is_s3(directory):
    return _atomicity.CommitFileTemporaryPath
  return None


class _RenameThenDelete:
  """Orbax deleter that removes steps with `steps.remove_step_folder`.

  Orbax removes a step folder file by file, so a reader could list the step
  and then find half of it gone; renaming first is atomic on a local or POSIX
  file system, so a reader sees the whole step or no step. On S3 (no rename)
  the commit marker goes first, so listings stop reporting the step before
  any of its data is removed. Only the primary process deletes.
  """

  def __init__(self, directory: epath.Path, primary_host: int | None):
    self._directory = directory
    self._primary_host = primary_host

  def delete(self, step: Step) -> None:
    if self._primary_host is not None and jax.process_index() != self._primary_host:
      return
    if not steps_lib.remove_step_folder(self._directory, step):
      logging.getLogger("kckpt").warning("Step %d was already gone from %s", step, self._directory)

  def delete_steps(self, steps: Sequence[Step]) -> None:
    for step in steps:
      self.delete(step)

  def close(self) -> None:
    pass


def _fsync_tree(root: str) -> None:
  """fsyncs every file and folder under `root` (and `root` itself)."""
  for folder, _, files in os.walk(root):
    for name in files:
      _fsync_path(os.path.join(folder, name))
    _fsync_path(folder)


def _fsync_path(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_after_rename(final: str) -> None:
  """The files `finalize` wrote last, the step folder and its parent (the rename)."""
  for name in (steps_lib.COMMIT_MARKER, steps_lib.STEP_METADATA_FILE):
    _fsync_path(os.path.join(final, name))
  _fsync_path(final)
  _fsync_path(os.path.dirname(final))


class DurableRenameTemporaryPath(_atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, with everything flushed to stable storage first.

  TensorStore already fsyncs array data, but the JSON files (tree metadata,
  metrics, step metadata) and the folders are written without it, so after a
  power loss a step that was renamed "finished" could hold empty files.
  Before the rename every file and folder of the step is fsynced; after it,
  the step and its parent folder (so that the rename itself is durable).
  """

  async def finalize(self, *args, **kwargs):
    tmp = str(self.get())
    await asyncio.to_thread(_fsync_tree, tmp)
    await super().finalize(*args, **kwargs)
    final = str(self.get_final())
    await asyncio.to_thread(_fsync_after_rename, final)


def _host_local_to_numpy(tree: PyTree) -> PyTree:
  """In a multi-process run, arrays held by one process are saved as replicated.

  Orbax refuses "host local" `jax.Array`s (a `step` counter on one device)
  when several processes save; every process holds the same value, so it is
  written once from NumPy.
  """
  if jax.process_count() == 1:
    return tree

  def convert(leaf):
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      return np.asarray(leaf)
    return leaf

  return jax.tree.map(convert, tree)


def _save_args(write: ItemWrite) -> ocp.args.CheckpointArgs:
  if write.format == "json":
    return ocp.args.JsonSave(write.value)
  return ocp.args.PyTreeSave(_host_local_to_numpy(write.value))


class Writer:
  """Owns the Orbax `CheckpointManager` of a run's ``checkpoints/`` folder."""

  def __init__(
      self,
      directory: epath.Path,
      *,
      async_save: bool,
      multiprocessing_options: MultiprocessingOptions | None,
      decide_preservation: Callable[[Sequence[Step]], Sequence[bool]],
      async_timeout_secs: int | None = None,
      durable: bool = True,
      sync: Any = None,
      storage: storage_lib.StorageOptions | None = None,
  ):
    """`sync`: a `kckpt.multihost.SaveSync` in a multi-process run (None alone)."""
    local = _is_local(directory)
    async_options = None
    if async_timeout_secs or sync is not None:
      async_options = ocp.AsyncOptions(
          **({"timeout_secs": async_timeout_secs} if async_timeout_secs else {}),
          # Orbax's background barriers, bounded and stopped early when another process fails.
          barrier_sync_fn=sync.barrier_sync_fn if sync is not None else None,
      )
    options = ocp.CheckpointManagerOptions(
        step_prefix=steps_lib.STEP_PREFIX,
        create=True,
        # kckpt decides when to save; the manager saves whenever asked (force=True).
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        async_options=async_options,
        multiprocessing_options=multiprocessing_options or MultiprocessingOptions(),
        preservation_policy=_Preservation(decide_preservation),
        # Set so that the manager writes `metrics/metrics` with each step that has
        # metrics (Orbax's own place for them); ranking is kckpt's, not this.
        best_fn=lambda metrics: 0.0,
        # Opening reads no per-step files: kckpt reads them lazily when a rule needs them.
        lightweight_initialize=True,
        # A crash mid-save leaves a temporary folder; remove it before saving again.
        cleanup_tmp_directories=True,
        temporary_path_class=_temporary_path_class(directory, durable),
    )
    self.directory = directory
    self._sync = sync
    self._manager = ocp.CheckpointManager(
        directory, options=options, handler_registry=_handler_registry(storage, multiprocessing_options)
    )
    self._on_durable = _report_durable(self._manager)
    if local or cloud.is_s3(directory):
      # Orbax 0.12 internal: the manager's deleter, replaced so that readers
      # never see a half-deleted step (see _RenameThenDelete; on S3 the commit
      # marker is removed first, then the objects).
      self._manager._checkpoint_deleter = _RenameThenDelete(  # pylint: disable=protected-access
          directory, (multiprocessing_options or MultiprocessingOptions()).primary_host
      )
    self._in_flight: Step | None = None
    self._lock = threading.Lock()

  @property
  def in_flight_step(self) -> Step | None:
    """The step whose async save was started and not yet waited for."""
    return self._in_flight

  def save(
      self,
      step: Step,
      writes: Sequence[ItemWrite],
      metrics: Metrics | None,
      custom_metadata: Mapping[str, Any] | None = None,
      on_durable: Callable[[float], None] | None = None,
  ) -> None:
    """Starts saving `step`; `on_durable(time.perf_counter())` once it is durable (not if it fails)."""
    self.wait()  # Surfaces an earlier failure before starting the next save.
    args = ocp.args.Composite(**{w.name: _save_args(w) for w in writes})
    self._on_durable[step] = on_durable
    if self._sync is not None:
      self._sync.begin_save(step)
    try:
      saved = self._manager.save(
          step, args=args, metrics=metrics, force=True, custom_metadata=dict(custom_metadata) if custom_metadata else None
      )
    except BaseException as e:
      self._on_durable.pop(step, None)
      if self._sync is not None:  # the other processes must not wait for this one
        self._sync.report_failure(f"{type(e).__name__}: {e}")
      raise
    if not saved:  # Orbax refuses silently only when read-only; never expected here.
      raise RuntimeError(f"Orbax did not save step {step} in {self.directory}")
    self._in_flight = step

  def is_busy(self) -> bool:
    # Orbax 0.12 internal: the manager's finalize thread, to check for a
    # finished background save without blocking the training loop.
    thread = self._manager._finalize_thread.get()  # pylint: disable=protected-access
    return thread is not None and thread.is_alive()

  def poll(self) -> None:
    """Raises the error of a finished background save, without blocking.

    A no-op in a multi-process run: there, errors are shared at points every
    process reaches (`Checkpointer.maybe_save`'s vote, `wait`).
    """
    if self._sync is None and self._in_flight is not None and not self.is_busy():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is durable; raises its error, naming the step.

    In a multi-process run every process calls it at the same point and the
    error of any process is raised on all of them.
    """
    with self._lock:
      step, self._in_flight = self._in_flight, None
      error = None
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-exception-caught
        # The manager dropped the steps it meant to delete from its cache although
        # the failed save deleted nothing: list them again so retention sees them.
        self._refresh_known_steps()
        error = e
      failures = self._sync.share_outcome(step, error) if self._sync is not None else {}
      if error is None and not failures:
        return
      if self._sync is None:
        where = f": {type(error).__name__}: {error}"
      else:
        where = " " + self._sync.describe(failures)
      raise BackgroundSaveError(
          f"Saving step {step} to {self.directory} failed in the background{where}."
          " The step was not written; earlier steps are intact.",
          step=step,
      ) from error

  def _refresh_known_steps(self) -> None:
    # Orbax 0.12 internal: the manager's cache of steps; `reload()` would read
    # every step's metadata, this lists the folder only.
    self._manager._checkpoints.set(  # pylint: disable=protected-access
        self._manager._load_checkpoint_infos(skip_metadata_read=True)  # pylint: disable=protected-access
    )

  def delete(self, step: Step) -> None:
    self.wait()
    if step not in self._manager.all_steps():  # written by an earlier process
      self._refresh_known_steps()
    self._manager.delete(step)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ItemRead:
  """One item to read as saved: NumPy arrays and Python scalars, or its JSON value."""

  name: str
  format: str


def _is_json_handler(handler_name: str) -> bool:
  return "Json" in handler_name


def item_format(handler_name: str) -> str:
  return "json" if _is_json_handler(handler_name) else "pytree"


def pytree_metadata(item_dir: epath.Path) -> PyTree:
  """The saved tree of an item, with Orbax metadata objects as leaves."""
  return ocp.PyTreeCheckpointHandler().metadata(item_dir).tree


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


def metadata_as_shape_dtype(item_dir: epath.Path) -> PyTree:
  """The saved tree with `jax.ShapeDtypeStruct` leaves (no array is read)."""

  def convert(meta):
    shape = getattr(meta, "shape", None)
    dtype = getattr(meta, "dtype", None)
    if shape is None or dtype is None:
      return meta
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))

  return jax.tree.map(convert, pytree_metadata(item_dir))


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
  as_saved = jax.tree.map(_as_saved_restore_args, pytree_metadata(item_dir))
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
    metadata = pytree_metadata(item_dir)
  item = jax.tree_util.tree_map_with_path(select, metadata)

  def args_for(keypath, leaf):
    if trees.path_str(keypath) in wanted and wanted[trees.path_str(keypath)] is None:
      return _as_saved_restore_args(leaf)
    return ocp.checkpoint_utils.construct_restore_args(leaf)

  restore_args = jax.tree_util.tree_map_with_path(args_for, item)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
    restored = reader.restore(item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
  return {path: leaf for path, leaf in trees.flatten_with_paths(restored).items() if path in wanted}


# Bytes read per Orbax call when restoring into a target: reading in batches
# bounds the transient host buffers (measured: a donated 512 MB restore grows
# peak memory by 26% of the state instead of 50%) and is no slower.
RESTORE_BATCH_BYTES = 128 * 2**20


def _read_handler(storage: storage_lib.StorageOptions | None) -> ocp.PyTreeCheckpointHandler:
  # The format is read from the checkpoint; of `storage`, only the read concurrency is used.
  return _pytree_handler(storage or storage_lib.StorageOptions(), None)


def read_tree_into(
    item_dir: epath.Path, target: PyTree, *, donate: bool, storage: storage_lib.StorageOptions | None = None
) -> PyTree:
  """Restores the pytree item at `item_dir` into the structure of `target`.

  The target must match the saved tree (checked by the caller). Leaves are
  read in batches of about `RESTORE_BATCH_BYTES` (the other leaves of the
  target are Orbax placeholders, so no saved metadata is needed); with
  `donate`, the target's arrays are all freed first (freeing them batch by
  batch was measured to leave a higher peak).
  """
  leaves = trees.flatten_with_paths(target)
  batches: list[set[str]] = [set()]
  size = 0
  for path, leaf in leaves.items():
    if batches[-1] and size >= RESTORE_BATCH_BYTES:
      batches.append(set())
      size = 0
    batches[-1].add(path)
    size += trees.tree_nbytes(leaf)
  abstract = abstract_target(target)
  if donate:
    release(list(leaves.values()))
  restored: dict[str, Any] = {}
  handler = _read_handler(storage)
  try:
    for batch in batches:
      if not batch:
        continue
      item = jax.tree_util.tree_map_with_path(
          lambda kp, leaf, batch=batch: leaf if trees.path_str(kp) in batch else ocp.PLACEHOLDER, abstract
      )
      try:
        out = handler.restore(
            item_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        )
      except Exception as e:  # pylint: disable=broad-exception-caught
        flat = trees.flatten_with_paths(abstract)
        raise LeafReadError(_unreadable_leaves(item_dir, sorted(batch), flat), e) from e
      restored.update({p: v for p, v in trees.flatten_with_paths(out).items() if p in batch})
  finally:
    handler.close()
  return trees.replace_leaves(target, restored)


class LeafReadError(Exception):
  """Some leaves of an item could not be read; names them."""

  def __init__(self, leaves: Sequence[str], cause: BaseException):
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0].split(" See full TensorStore")[0]
    if len(first_line) > 300:
      first_line = first_line[:300] + "..."
    super().__init__(f"unreadable leaves {list(leaves)}: {type(cause).__name__}: {first_line}")
    self.leaves = tuple(leaves)


def _unreadable_leaves(item_dir: epath.Path, paths: Sequence[str], abstract: Mapping[str, Any]) -> list[str]:
  """On the error path only: reads the leaves one by one to name those at fault."""
  bad = []
  try:
    metadata = pytree_metadata(item_dir)
  except Exception:  # pylint: disable=broad-exception-caught
    return list(paths)
  for path in paths:
    try:
      read_leaves(item_dir, {path: abstract[path]}, metadata=metadata)
    except Exception:  # pylint: disable=broad-exception-caught
      bad.append(path)
  return bad or list(paths)


def read_items(
    step_path: epath.Path, reads: Sequence[ItemRead], storage: storage_lib.StorageOptions | None = None
) -> dict[str, Any]:
  """Reads the named items of the finished step at `step_path`; only those.

  The format (OCDBT, Zarr version, compression) is read from the checkpoint;
  of `storage`, only the read concurrency limit is used.
  """
  args = ocp.args.Composite(**{r.name: _restore_args(r, step_path / r.name) for r in reads})
  registry = _handler_registry(storage, None) if storage is not None else None
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry)) as reader:
    restored = reader.restore(step_path, args=args)
  return {r.name: restored[r.name] for r in reads}


def release(tree: PyTree) -> None:
  """Frees the device memory of every `jax.Array` in `tree` (donation)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      leaf.delete()


# ---------------------------------------------------------------------------
# Reading a few leaves at a time (the `kckpt` command: tree, diff, verify, export)
# ---------------------------------------------------------------------------

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


def _saved_leaf(path: str, meta: Any) -> SavedLeaf:
  kind = _LEAF_KINDS.get(type(meta).__name__, type(meta).__name__)
  shape = getattr(meta, "shape", None)
  dtype = getattr(meta, "dtype", None)
  return SavedLeaf(
      path=path,
      kind=kind,
      shape=tuple(shape) if shape is not None else None,
      dtype=np.dtype(dtype) if dtype is not None else None,
  )


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
    self._template = pytree_metadata(self.item_dir)
    self._keypaths: dict[str, tuple[Any, ...]] = {}
    self.leaves: dict[str, SavedLeaf] = {}
    for keypath, meta in jax.tree_util.tree_flatten_with_path(self._template)[0]:
      path = trees.path_str(keypath)
      self._keypaths[path] = keypath
      self.leaves[path] = _saved_leaf(path, meta)

  def read(self, paths: Sequence[str]) -> dict[str, Any]:
    """Reads the leaves at `paths` (dotted paths of `leaves`); only those."""
    return read_leaves(self.item_dir, {p: None for p in paths}, metadata=self._template) if paths else {}

  def rebuild(self, values: Mapping[str, Any], *, top_level_key: str | None = None) -> PyTree:
    """The saved tree (or its `top_level_key` subtree) with `values` as leaves.

    `values` maps dotted paths to leaves and must hold every leaf of the
    (sub)tree.
    """
    template = self._template
    if top_level_key is not None:
      template = template[top_level_key]
      prefix = (jax.tree_util.DictKey(top_level_key),)
    else:
      prefix = ()
    return jax.tree_util.tree_map_with_path(lambda keypath, _: values[trees.path_str(prefix + keypath)], template)

  def top_level_keys(self) -> list[str]:
    """The keys of the saved tree's top level when it is a dict (else empty)."""
    return [str(k) for k in self._template] if isinstance(self._template, Mapping) else []


# ---------------------------------------------------------------------------
# Storage options and save telemetry
# ---------------------------------------------------------------------------


def _pytree_handler(
    storage: storage_lib.StorageOptions, multiprocessing_options: MultiprocessingOptions | None
) -> ocp.PyTreeCheckpointHandler:
  """The Orbax handler of every pytree item, with kckpt's on-disk format."""
  return ocp.PyTreeCheckpointHandler(
      use_ocdbt=storage.use_ocdbt,
      use_zarr3=storage.use_zarr3,
      use_compression=storage.compression,
      save_concurrent_gb=storage.save_concurrent_gb,  # type: ignore[arg-type]  # Orbax multiplies by 1e9
      restore_concurrent_gb=storage.restore_concurrent_gb,  # type: ignore[arg-type]
      multiprocessing_options=multiprocessing_options or MultiprocessingOptions(),
  )


def _handler_registry(
    storage: storage_lib.StorageOptions | None, multiprocessing_options: MultiprocessingOptions | None
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """A registry whose default handler for `PyTreeSave`/`PyTreeRestore` uses `storage`.

  Registered for item None, Orbax uses the handler for every item name it
  meets (`CompositeCheckpointHandler._get_or_set_handler`), so a `Composite`
  of any names is written with the same options. JSON items fall back to
  Orbax's global registry, as before.
  """
  handler = _pytree_handler(storage or storage_lib.StorageOptions(), multiprocessing_options)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(None, ocp.args.PyTreeSave, handler)
  registry.add(None, ocp.args.PyTreeRestore, handler)
  return registry


def _report_durable(manager: ocp.CheckpointManager) -> dict[Step, Callable[[float], None] | None]:
  """Makes `manager` call `callbacks.pop(step)(time.perf_counter())` when a save of `step` is durable.

  Orbax has no hook after a step is committed (`post_finalization_callback`
  runs before the rename), and a thread waiting on the finalize thread costs
  the caller tens of ms to start on 2 busy cores. So the manager's own
  finalize step (run in its background thread for async saves, inline for
  sync ones) is wrapped on this instance. Nothing is called when the save
  fails: its error reaches the caller at the next `wait()`.
  """
  callbacks: dict[Step, Callable[[float], None] | None] = {}
  # Orbax 0.12 internal: `CheckpointManager._finalize(step, steps_to_remove)`
  # commits the step and deletes old ones; the finalize thread's target is
  # looked up on the instance when a save starts.
  finalize = manager._finalize  # pylint: disable=protected-access

  def finalize_and_report(step, *args, **kwargs):
    try:
      finalize(step, *args, **kwargs)
    except BaseException:
      callbacks.pop(step, None)
      raise
    callback = callbacks.pop(step, None)
    if callback is not None:
      callback(time.perf_counter())

  manager._finalize = finalize_and_report  # pylint: disable=protected-access
  return callbacks


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
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top
    import tensorstore as ts  # pylint: disable=g-import-not-at-top

    meta_file = item_dir / "_METADATA"
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
    if arrays:
      spec = ts_utils.build_kvstore_tspec(str(item_dir), use_ocdbt=use_ocdbt)
      if not use_ocdbt:  # a plain kvstore: keys are relative to a folder path ending in '/'
        spec = {**spec, "path": spec["path"].rstrip("/") + "/"}
      kvstore = ts.KvStore.open(spec, context=ts_utils.get_ts_context(use_ocdbt=use_ocdbt)).result()
      suffix = "zarr.json" if use_zarr3 else ".zarray"
      reads = {name: kvstore.read(f"{name}/{suffix}") for name in arrays}
      for name, future in reads.items():
        result = future.result()
        if result.state != "value":
          return None
        zarr = json.loads(bytes(result.value))
        dtype = zarr["data_type"] if use_zarr3 else zarr["dtype"]
        if not isinstance(dtype, str):
          return None
        specs[name] = trees.LeafSpec(tuple(int(d) for d in zarr["shape"]), np.dtype(jax.numpy.dtype(dtype)))
    return specs
  except Exception:  # pylint: disable=broad-exception-caught
    return None
