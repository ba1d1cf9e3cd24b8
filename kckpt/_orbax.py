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

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kckpt import steps as steps_lib
from kckpt import storage as storage_lib
from kckpt import trees
from kckpt._types import Metrics, PyTree, Step
from kckpt.errors import BackgroundSaveError

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
      storage: storage_lib.StorageOptions | None = None,
  ):
    options = ocp.CheckpointManagerOptions(
        step_prefix=steps_lib.STEP_PREFIX,
        create=True,
        # kckpt decides when to save; the manager saves whenever asked (force=True).
        save_interval_steps=1,
        enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(timeout_secs=async_timeout_secs) if async_timeout_secs else None,
        multiprocessing_options=multiprocessing_options or MultiprocessingOptions(),
        preservation_policy=_Preservation(decide_preservation),
        # Set so that the manager writes `metrics/metrics` with each step that has
        # metrics (Orbax's own place for them); ranking is kckpt's, not this.
        best_fn=lambda metrics: 0.0,
        # Opening reads no per-step files: kckpt reads them lazily when a rule needs them.
        lightweight_initialize=True,
        # A crash mid-save leaves a temporary folder; remove it before saving again.
        cleanup_tmp_directories=True,
    )
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory, options=options, handler_registry=_handler_registry(storage, multiprocessing_options)
    )
    self._in_flight: Step | None = None
    self._lock = threading.Lock()
    self._on_durable = _report_durable(self._manager)

  @property
  def in_flight_step(self) -> Step | None:
    """The step whose async save was started and not yet waited for."""
    return self._in_flight

  def save(
      self,
      step: Step,
      writes: Sequence[ItemWrite],
      metrics: Metrics | None,
      on_durable: Callable[[float], None] | None = None,
  ) -> None:
    """Starts saving `step`; `on_durable(time.perf_counter())` once it is durable (not if it fails)."""
    self.wait()  # Surfaces an earlier failure before starting the next save.
    self._on_durable[step] = on_durable
    args = ocp.args.Composite(**{w.name: _save_args(w) for w in writes})
    try:
      saved = self._manager.save(step, args=args, metrics=metrics, force=True)
    except BaseException:
      self._on_durable.pop(step, None)
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
    """Raises the error of a finished background save, without blocking."""
    if self._in_flight is not None and not self.is_busy():
      self.wait()

  def wait(self) -> None:
    """Blocks until the save in flight is durable; raises its error, naming the step."""
    with self._lock:
      step, self._in_flight = self._in_flight, None
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-exception-caught
        # The manager dropped the steps it meant to delete from its cache although
        # the failed save deleted nothing: list them again so retention sees them.
        self._refresh_known_steps()
        raise BackgroundSaveError(
            f"Saving step {step} to {self.directory} failed in the background: {type(e).__name__}: {e}."
            " The step was not written; earlier steps are intact.",
            step=step,
        ) from e

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
  """One item to read: `target` None reads it as saved (NumPy arrays / JSON)."""

  name: str
  format: str
  target: PyTree = None


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


def _leaf_specs_from_orbax_metadata(item_dir: epath.Path) -> dict[str, trees.LeafSpec]:
  specs = {}
  for path, meta in trees.flatten_with_paths(pytree_metadata(item_dir)).items():
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
  if read.target is None:
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), pytree_metadata(item_dir))
    return ocp.args.PyTreeRestore(item=None, restore_args=as_numpy)
  return ocp.args.PyTreeRestore(
      item=read.target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(read.target),
  )


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


def item_handler_names(step_path: epath.Path) -> Mapping[str, str]:
  return steps_lib.read_item_names(step_path)


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
