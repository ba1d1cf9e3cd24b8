"""The writer: one Orbax `CheckpointManager` per run, saving named items asynchronously."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kckpt import _fs
from kckpt import _layout
from kckpt import storage as storage_lib
from kckpt._orbax import _checksums, _commit, _format, _handlers, _kvstore_specs
from kckpt._types import Metrics, PyTree, Step
from kckpt.errors import BackgroundSaveError

MultiprocessingOptions = _handlers.MultiprocessingOptions


@dataclasses.dataclass(frozen=True)
class ItemWrite:
  name: str
  format: str  # "pytree" | "json"
  value: Any
  escaped: bool = False  # its dict keys were escaped (`trees.escape_dotted_keys`)


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
    keep_at_deletion: Callable[[Step], bool] | None = None,
    async_timeout_secs: int | None = None,
    durable: bool = True,
    sync: Any = None,
    storage: storage_lib.StorageOptions | None = None,
  ):
    """`sync`: a `kckpt.multihost.SaveSync` in a multi-process run (None alone)."""
    local = _fs.is_local(directory)
    async_options = None
    if async_timeout_secs or sync is not None:
      async_options = ocp.AsyncOptions(
        timeout_secs=async_timeout_secs or ocp.AsyncOptions().timeout_secs,
        # Orbax's background barriers, bounded and stopped early when another process fails.
        barrier_sync_fn=sync.barrier_sync_fn if sync is not None else None,
      )
    options = ocp.CheckpointManagerOptions(
      step_prefix=_layout.STEP_PREFIX,
      create=True,
      # kckpt decides when to save; the manager saves whenever asked (force=True).
      save_interval_steps=1,
      enable_async_checkpointing=async_save,
      async_options=async_options,
      multiprocessing_options=multiprocessing_options or MultiprocessingOptions(),
      preservation_policy=_Preservation(decide_preservation),
      # No `best_fn`: ranking is kckpt's. Metrics are written as a JSON item
      # named ``metrics`` (Orbax's own place, ``metrics/metrics``), so Orbax
      # tracks none and warns of none.
      # Opening reads no per-step files: kckpt reads them lazily when a rule needs them.
      lightweight_initialize=True,
      # A crash mid-save leaves a temporary folder; remove it before saving again.
      cleanup_tmp_directories=True,
      **_commit.commit_options(directory, durable),
    )
    self.directory = directory
    self._sync = sync
    storage = storage or storage_lib.StorageOptions()
    self.checksums = storage.checksums  # arrays written here get a CRC32C per saved shard
    # Arrays written here get per-leaf statistics (and checksums): see `_checksums`.
    self._checksum_scope: Any = _checksums.register(directory, checksums=storage.checksums)
    _kvstore_specs.install()  # each array's kvstore spec without TensorStore's leaking `to_json`
    self._manager = ocp.CheckpointManager(
      directory, options=options, handler_registry=_handlers.handler_registry(storage, multiprocessing_options)
    )
    self._on_durable = _report_durable(self._manager)
    if local or _fs.is_object_store(directory):
      # Orbax 0.12 internal: the manager's deleter, replaced so that readers
      # never see a half-deleted step (see _commit.RenameThenDelete; on S3 the commit
      # marker is removed first, then the objects).
      self._manager._checkpoint_deleter = _commit.RenameThenDelete(  # pylint: disable=protected-access
        directory,
        (multiprocessing_options or MultiprocessingOptions()).primary_host,
        keep=keep_at_deletion,
        on_kept=self._refresh_known_steps,
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
    before_commit: Callable[[epath.Path], None] | None = None,
  ) -> None:
    """Starts saving `step`; `on_durable(time.perf_counter())` once it is durable (not if it fails).

    `before_commit(temporary step folder)` runs on the primary process just
    before the commit (see `_commit.before_commit`).
    """
    self.wait()  # Surfaces an earlier failure before starting the next save.
    args = ocp.args.Composite(
      **{w.name: _save_args(w) for w in writes},
      **({_format.METRICS_ITEM: ocp.args.JsonSave(dict(metrics))} if metrics is not None else {}),
    )
    self._on_durable[step] = on_durable
    final = _layout.step_dir(self.directory, step)
    _commit.before_commit(final, before_commit)
    if self._sync is not None:
      self._sync.begin_save(step)
    try:
      saved = self._manager.save(step, args=args, force=True, custom_metadata=dict(custom_metadata) if custom_metadata else None)
    except BaseException as e:
      self._on_durable.pop(step, None)
      _commit.before_commit(final, None)
      if self._sync is not None:  # the other processes must not wait for this one
        self._sync.report_failure(f"{type(e).__name__}: {e}")
      raise
    if not saved:  # Orbax refuses silently only when read-only; never expected here.
      raise RuntimeError(f"Orbax did not save step {step} in {self.directory}")
    self._in_flight = step

  def post_stats(self, partials: Mapping[str, Any]) -> None:
    """A non-primary process hands the primary the statistics of the shards it wrote (multi-process runs)."""
    if self._sync is not None:
      self._sync.post_stats(partials)

  def gathered_stats(self) -> list[Any]:
    """On the primary, before the commit: the statistics every other process posted for this save."""
    return self._sync.gathered_stats() if self._sync is not None else []

  def is_busy(self) -> bool:
    """Whether the background part of a save (commit, deleting old steps) is still running.

    Orbax answers under a lock it also holds while the finalize thread passes
    its last cross-process barrier, so in a multi-process run this can block
    briefly (bounded by that barrier's timeout).
    """
    return self._manager.is_saving_in_progress()

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
      try:
        self._manager.close()
      finally:
        if self._checksum_scope is not None:
          self._checksum_scope.close()
          self._checksum_scope = None


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
      try:
        callback(time.perf_counter())
      except Exception:  # pylint: disable=broad-exception-caught  # telemetry must not fail a committed save
        logging.getLogger("kckpt").exception("kckpt: recording the save stats of step %d failed", step)

  manager._finalize = finalize_and_report  # type: ignore[method-assign]  # pylint: disable=protected-access
  return callbacks
