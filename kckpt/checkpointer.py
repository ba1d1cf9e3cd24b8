"""The `Checkpointer` users hold: a frozen config and the behaviour in one object.

`BaseCheckpointer` is the interface; `Checkpointer` saves with Orbax;
`NoopCheckpointer` does nothing (for debugging runs and tests).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import functools
import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Self

import jax
from etils import epath

from kckpt import _orbax
from kckpt import cloud
from kckpt import items as items_lib
from kckpt import lock as lock_lib
from kckpt import markers
from kckpt import multihost
from kckpt import policies
from kckpt import steps as steps_lib
from kckpt import storage as storage_lib
from kckpt import trees
from kckpt import watch
from kckpt._types import Metrics, PathLike, Step
from kckpt.errors import (
    CheckpointNotFoundError,
    CheckpointReadError,
    ReadOnlyCheckpointerError,
    StepAlreadyExistsError,
    TreeMismatchError,
)

log = logging.getLogger("kckpt")

StepSpec = int | str  # a step number, -1, "latest" or "best"


class BaseCheckpointer(abc.ABC):
  """The interface shared by `Checkpointer` and `NoopCheckpointer`."""

  @abc.abstractmethod
  def restore(self, state: Any = None, *, step: StepSpec = -1, noop_if_missing: bool = False, donate: bool = True) -> Any:
    """Restores `state` from a checkpoint."""

  @abc.abstractmethod
  def should_save(self, step: Step) -> bool:
    """Whether `maybe_save` would save at `step`."""

  @abc.abstractmethod
  def save(self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None) -> bool:
    """Saves `state` as `step`; True when a save was started."""

  def maybe_save(self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None) -> bool:
    """Saves when `should_save(step)` or `force`; True when a save was started."""
    if force or self.should_save(step):
      return self.save(state, step=step, force=True, metrics=metrics)
    return False

  def delete(self, step: Step) -> None:
    """Removes one step."""
    raise NotImplementedError(f"{type(self).__name__} cannot delete steps")

  @property
  def latest_step(self) -> Step | None:
    """The newest finished step, or None."""
    return None

  @property
  def all_steps(self) -> list[Step]:
    """The finished steps, sorted."""
    return []

  def reload(self) -> None:
    """Re-reads the folder (another process may have written)."""

  def item_metadata(self, step: StepSpec = -1) -> Any:
    """Shapes and dtypes of the saved leaves, read without loading arrays."""
    raise NotImplementedError(f"{type(self).__name__} has no checkpoints")

  def iter_new_checkpoints(
      self,
      *,
      min_interval_secs: float = 0,
      timeout: float | None = None,
      timeout_fn: Callable[[], bool] | None = None,
  ) -> Iterator[Step]:
    """Yields each new finished step as it appears."""
    del min_interval_secs, timeout, timeout_fn
    yield from ()

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are durable; raises any error they hit."""

  def request_preemption(self) -> None:
    """Asks the run to stop at the next `maybe_save` (see `Checkpointer.request_preemption`)."""

  @property
  def reached_preemption(self) -> bool:
    """True once a preemption was saved: the training loop should exit."""
    return False

  def close(self) -> None:
    """Finishes pending work and releases resources."""

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Validation of fields
# ---------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"Checkpointer.{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check_step(step: Any) -> Step:
  if isinstance(step, (bool, float)) or not hasattr(step, "__index__"):
    raise ValueError(f"step must be a non-negative int, got {type(step).__name__}: {step!r}")
  step = operator.index(step)
  if step < 0:
    raise ValueError(f"step must be a non-negative int, got {step}")
  return step


def _as_timedelta(name: str, value: Any) -> datetime.timedelta | None:
  if value is None:
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = datetime.timedelta(seconds=value)
  if not isinstance(value, datetime.timedelta) or value.total_seconds() <= 0:
    raise ValueError(f"Checkpointer.{name} must be a positive datetime.timedelta (or seconds), got {value!r}")
  return value


_TIMEDELTA_FIELDS = ("keep_time_interval",)


@dataclasses.dataclass
class _Runtime:
  """Mutable state of one `Checkpointer` instance (never part of its identity)."""

  writer: _orbax.Writer | None = None
  writer_lock: lock_lib.WriterLock | None = None
  listing: steps_lib.StepListing | None = None
  records: dict[Step, policies.StepRecord] = dataclasses.field(default_factory=dict)
  known_finished: frozenset[Step] = frozenset()
  last_save_time: float = dataclasses.field(default_factory=time.time)
  lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
  preemption_requested: bool = False
  reached_preemption: bool = False
  sigterm_handler: weakref.finalize | None = None  # removes kckpt's SIGTERM handler (close, or GC)
  save_stats: storage_lib.TransferStats | None = None
  restore_stats: storage_lib.TransferStats | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpointer(BaseCheckpointer):
  """Saves, keeps and restores the checkpoints of one run, with Orbax.

  Steps live in ``<workdir>/checkpoints/ckpt_<step>/`` (Kauldron's layout).
  Building one does no I/O; the Orbax manager is made on the first save.

  Attributes:
    workdir: root of the run (local path, ``gs://`` or ``s3://``). May be None in a
      config and bound later with ``dataclasses.replace(ckpt, workdir=...)``;
      any I/O while it is None raises ValueError.
    save_interval_steps: `maybe_save` saves when ``step % save_interval_steps
      == 0`` (None: only by the other rules).
    max_to_keep: keep the newest N steps (None: keep all). With a best
      metric, keep the best N, and the newest in addition.
    keep_time_interval: also keep one step per interval, forever
      (`datetime.timedelta`; a number is read as seconds).
    keep_period: also keep every step divisible by N, forever.
    save_on_steps: extra steps that `maybe_save` always saves.
    best_metric_path: dotted path into the `metrics` given to `save`
      (``"eval.loss"``) that ranks steps for `max_to_keep`.
    best_mode: ``"max"`` or ``"min"``: which scores are best.
    multiprocessing_options: Orbax's `MultiprocessingOptions` (None: Orbax's
      default).
    create: create the folder and allow writes. False for eval jobs and
      notebooks: never writes, never deletes.
    async_save: save in the background (the training loop is blocked only
      while arrays are copied off the device).
    save_interval_secs: `maybe_save` also saves when this many seconds passed
      since the last save. Decided on the primary process and shared.
    never_save_step_zero: `maybe_save` never saves step 0.
    best_fn: instead of `best_metric_path`, a function of the metrics that
      returns the score.
    async_timeout_secs: how long a background save may wait for the other
      processes before failing (None: Orbax's default).
    durable: flush every file of a step to stable storage before it is marked
      finished (local file systems), so a power loss cannot leave a finished
      step with empty files.
    lock_stale_secs: a second writer on this workdir fails at its first save
      (`ConcurrentWriterError`) unless the first one's lock has not been
      refreshed for this long (see `kckpt.lock`).
    barrier_timeout_secs: in a multi-process run, how long a call waits for
      the other processes to make the same call (`maybe_save`, `save`,
      `wait_until_finished`, `close`, `restore`, `latest_step`) before raising
      `ProcessTimeoutError`: a process that died or is stuck never makes the
      others hang.
    handle_sigterm: on SIGTERM (a preemption notice), do not die: the next
      `maybe_save` saves the current step on every process and sets
      `reached_preemption` (see `request_preemption`). The handler is
      installed by the first `maybe_save` and removed by `close`.
    storage: `kckpt.StorageOptions`: the on-disk format (compression, OCDBT,
      Zarr version) and I/O concurrency limits of saves. The default is the
      fastest measured (uncompressed, OCDBT, Zarr v2);
      ``StorageOptions.orbax_defaults()`` writes what plain Orbax writes.
      Restores read any format.
    s3_endpoint: for ``s3://`` workdirs, the S3 endpoint URL (MinIO, R2...),
      overriding ``AWS_ENDPOINT_URL``; applies to the whole process (see
      `kckpt.cloud`).
    s3_region: for ``s3://`` workdirs, the region, overriding ``AWS_REGION``
      / ``AWS_DEFAULT_REGION``; applies to the whole process.

  Example:

  >>> import tempfile, numpy as np, kckpt
  >>> ckpt = kckpt.Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=10, async_save=False)
  >>> ckpt.maybe_save({"w": np.ones(3)}, step=10)
  True
  >>> ckpt.restore({"w": np.zeros(3)})["w"]
  array([1., 1., 1.])
  >>> ckpt.latest_step
  10
  """

  workdir: PathLike | None = None
  save_interval_steps: int | None
  max_to_keep: int | None = 3
  keep_time_interval: datetime.timedelta | None = None
  keep_period: int | None = None
  save_on_steps: Sequence[Step] | None = None
  best_metric_path: str | None = None
  best_mode: str = "max"
  multiprocessing_options: _orbax.MultiprocessingOptions | None = dataclasses.field(default=None, hash=False)
  create: bool = True
  async_save: bool = True
  save_interval_secs: float | None = None
  never_save_step_zero: bool = False
  best_fn: Callable[[Metrics], float] | None = None
  async_timeout_secs: int | None = None
  durable: bool = True
  lock_stale_secs: float = 60.0
  barrier_timeout_secs: float = multihost.DEFAULT_BARRIER_TIMEOUT_SECS
  handle_sigterm: bool = True
  storage: storage_lib.StorageOptions = storage_lib.StorageOptions()
  s3_endpoint: str | None = None
  s3_region: str | None = None

  def __post_init__(self):
    _check_positive_int("save_interval_steps", self.save_interval_steps)
    _check_positive_int("max_to_keep", self.max_to_keep)
    _check_positive_int("keep_period", self.keep_period)
    _check_positive_int("async_timeout_secs", self.async_timeout_secs)
    object.__setattr__(self, "keep_time_interval", _as_timedelta("keep_time_interval", self.keep_time_interval))
    if self.save_on_steps is not None:
      object.__setattr__(self, "save_on_steps", tuple(sorted({_check_step(s) for s in self.save_on_steps})))
    if self.best_mode not in policies.BEST_MODES:
      raise ValueError(f"Checkpointer.best_mode must be one of {policies.BEST_MODES}, got {self.best_mode!r}")
    if self.best_metric_path is not None and (not isinstance(self.best_metric_path, str) or not self.best_metric_path):
      raise ValueError(f"Checkpointer.best_metric_path must be a dotted path like 'eval.loss', got {self.best_metric_path!r}")
    if self.best_metric_path is not None and self.best_fn is not None:
      raise ValueError("Checkpointer: give best_metric_path or best_fn, not both")
    if self.save_interval_secs is not None and (
        isinstance(self.save_interval_secs, bool) or not isinstance(self.save_interval_secs, (int, float)) or self.save_interval_secs <= 0
    ):
      raise ValueError(f"Checkpointer.save_interval_secs must be a positive number, got {self.save_interval_secs!r}")
    if isinstance(self.barrier_timeout_secs, bool) or not isinstance(self.barrier_timeout_secs, (int, float)) or self.barrier_timeout_secs <= 0:
      raise ValueError(f"Checkpointer.barrier_timeout_secs must be a positive number, got {self.barrier_timeout_secs!r}")
    if self.workdir is not None and not isinstance(self.workdir, (str, os.PathLike)):
      raise ValueError(f"Checkpointer.workdir must be a path, got {type(self.workdir).__name__}: {self.workdir!r}")
    if not isinstance(self.storage, storage_lib.StorageOptions):
      raise ValueError(f"Checkpointer.storage must be a kckpt.StorageOptions, got {type(self.storage).__name__}: {self.storage!r}")

  # -- Construction ---------------------------------------------------------

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> Checkpointer:
    """Builds a `Checkpointer` from a plain mapping (or a `ConfigDict`).

    Time intervals may be given as seconds; `multiprocessing_options` as a
    mapping of Orbax's `MultiprocessingOptions` fields.

    >>> ckpt = Checkpointer.from_config({"save_interval_steps": 100, "keep_time_interval": 3600})
    >>> ckpt.keep_time_interval
    datetime.timedelta(seconds=3600)
    """
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"Checkpointer.from_config expects a mapping, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"Checkpointer.from_config: unknown fields {unknown}; the fields are {sorted(known)}")
    kwargs = dict(config)
    mp = kwargs.get("multiprocessing_options")
    if isinstance(mp, Mapping):
      kwargs["multiprocessing_options"] = _orbax.MultiprocessingOptions(**mp)
    if isinstance(kwargs.get("storage"), Mapping):
      kwargs["storage"] = storage_lib.StorageOptions(**kwargs["storage"])
    if "save_on_steps" in kwargs and kwargs["save_on_steps"] is not None:
      kwargs["save_on_steps"] = tuple(kwargs["save_on_steps"])
    return cls(**kwargs)

  @classmethod
  def open(cls, workdir: PathLike, **kwargs: Any) -> Checkpointer:
    """A read-only `Checkpointer` on an existing run (for notebooks and eval jobs).

    >>> import tempfile
    >>> Checkpointer.open(tempfile.mkdtemp()).all_steps
    []
    """
    kwargs.setdefault("save_interval_steps", None)
    return cls(workdir=workdir, create=False, **kwargs)

  def replace(self, **changes: Any) -> Checkpointer:
    """``dataclasses.replace(self, **changes)``: a new, unopened Checkpointer."""
    return dataclasses.replace(self, **changes)

  # -- Lazily built state ---------------------------------------------------

  @functools.cached_property
  def _rt(self) -> _Runtime:
    return _Runtime()

  @property
  def directory(self) -> epath.Path:
    """``<workdir>/checkpoints``; raises ValueError while `workdir` is None."""
    if self.workdir is None:
      raise ValueError(
          "Checkpointer.workdir is None: bind it before saving or restoring, e.g."
          " `ckpt = dataclasses.replace(ckpt, workdir='/path/to/run')`."
      )
    workdir = self.workdir
    if self.s3_endpoint or self.s3_region:
      cloud.configure_s3(endpoint=self.s3_endpoint, region=self.s3_region)
    if "://" not in str(workdir) and not os.path.isabs(workdir):
      workdir = os.path.abspath(workdir)  # Orbax refuses relative paths (in the background)
    return steps_lib.checkpoints_dir(workdir)

  def _writer(self) -> _orbax.Writer:
    if not self.create:
      raise ReadOnlyCheckpointerError(
          f"This Checkpointer of {self.workdir} is read-only (create=False): it never saves or deletes."
      )
    rt = self._rt
    with rt.lock:
      if rt.writer is None:
        directory = self.directory
        if epath.Path(self.workdir).exists() and not epath.Path(self.workdir).is_dir():
          raise ValueError(f"Checkpointer.workdir {self.workdir} exists and is not a folder")
        if multihost.is_primary():
          # Before the Orbax manager: opening it cleans up temporary folders,
          # which could be another live writer's step in progress.
          writer_lock = lock_lib.WriterLock(directory, stale_secs=self.lock_stale_secs)
          writer_lock.acquire()
          rt.writer_lock = writer_lock
          markers.clear_end_marker(self.workdir)  # saving again: the run is not finished
          steps_lib.write_retention_rules(directory, policies.retention_rules(self.retention_policy))
        rt.writer = _orbax.Writer(
            directory,
            async_save=self.async_save,
            multiprocessing_options=self.multiprocessing_options,
            decide_preservation=self._decide_preservation,
            async_timeout_secs=self.async_timeout_secs,
            durable=self.durable,
            sync=multihost.SaveSync(str(directory), timeout_secs=self.barrier_timeout_secs)
            if multihost.process_count() > 1 else None,
            storage=self.storage,
        )
      return rt.writer

  @property
  def save_policy(self) -> policies.SavePolicy:
    return policies.SavePolicy(
        interval_steps=self.save_interval_steps,
        on_steps=frozenset(self.save_on_steps or ()),
        interval_secs=self.save_interval_secs,
        never_save_step_zero=self.never_save_step_zero,
    )

  @property
  def retention_policy(self) -> policies.RetentionPolicy:
    return policies.RetentionPolicy(
        max_to_keep=self.max_to_keep,
        keep_period=self.keep_period,
        keep_time_interval_secs=policies.timedelta_seconds(self.keep_time_interval),
        best_metric_path=self.best_metric_path,
        best_fn=self.best_fn,
        best_mode=self.best_mode,  # type: ignore[arg-type]
    )

  # -- Listing --------------------------------------------------------------

  def _listing(self, *, fresh: bool = False) -> steps_lib.StepListing:
    rt = self._rt
    in_flight = rt.writer is not None and rt.writer.in_flight_step is not None
    if fresh or in_flight or rt.listing is None:
      # Steps seen finished by an earlier listing (kept across `reload()`): on
      # object stores their commit markers are not asked for again, so a poll
      # is one prefix listing. A step missing from a listing is forgotten.
      listing = steps_lib.list_steps(self.directory, known_finished=rt.known_finished)
      rt.known_finished = frozenset(listing.finished)
      rt.listing = None if in_flight else listing
      return listing
    return rt.listing

  @property
  def all_steps(self) -> list[Step]:
    """The finished steps, sorted (cached until `reload()` or a save)."""
    return list(self._listing().finished)

  @property
  def latest_step(self) -> Step | None:
    """The newest finished step, or None.

    In a multi-process run it is the primary's answer, the same on every
    process (so each process must read it).
    """
    finished = self._listing().finished
    return self._agreed_step(finished[-1] if finished else None, what="latest_step")

  def _agreed_step(self, step: Step | None, *, what: str) -> Step | None:
    if multihost.process_count() == 1:
      return step
    return multihost.primary_value(step, timeout_secs=self.barrier_timeout_secs, what=what)

  def reload(self) -> None:
    """Forgets the cached step list, so the next call lists the folder again."""
    self._rt.listing = None

  # -- Saving ---------------------------------------------------------------

  def should_save(self, step: Step) -> bool:
    """Whether `maybe_save` would save at `step` (False if it already exists)."""
    step = _check_step(step)
    time_due = False
    if self._time_rule_applies(step):
      # The clock differs between hosts: the primary decides for all.
      time_due = multihost.agree(
          self._time_due(), timeout_secs=self.barrier_timeout_secs, what=f"should_save(step={step})"
      )
    return self._should_save(step, time_due=time_due)

  def _time_rule_applies(self, step: Step) -> bool:
    policy = self.save_policy
    return (
        policy.interval_secs is not None
        and policies.save_reason(policy, step) is None
        and not (step == 0 and policy.never_save_step_zero)
    )

  def _time_due(self) -> bool:
    """Whether `save_interval_secs` passed since the last save, on this process's clock."""
    secs = self.save_interval_secs
    return secs is not None and time.time() - self._rt.last_save_time >= secs

  def _should_save(self, step: Step, *, time_due: bool) -> bool:
    reason = policies.save_reason(self.save_policy, step)
    if reason is None and time_due and self._time_rule_applies(step):
      reason = "time"
    if reason is None:
      return False
    return not self._step_exists(step)

  def _step_exists(self, step: Step) -> bool:
    writer = self._rt.writer
    if writer is not None and writer.in_flight_step == step:
      return True
    return step in self._listing().finished

  def save(
      self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None, tag: str | None = None
  ) -> bool:
    """Saves `state` as `step` now (in the background when `async_save`).

    Args:
      state: a pytree, a `kckpt.items.CheckpointItem`, a `Composite` or a
        `TopLevelCheckpointItem`.
      step: the step number.
      force: when the step already exists, return False instead of raising
        (a final save at the end of training that may repeat the last one).
      metrics: nested dict of numbers (Python, NumPy or JAX scalars), stored
        with the step and used by `best_metric_path` / `best_fn`.
      tag: a name for the step (``"E10_U200_S800"``, ``"before-lr-drop"``)
        that `restore(step=tag)` accepts; the newest step with it wins.

    Returns:
      True when a save was started; False when `force` and the step exists.

    Raises:
      StepAlreadyExistsError: the step exists and `force` is False.
      ValueError: the state holds a leaf that cannot be saved, a JSON item is
        not serialisable, or the metrics lack the best metric.
      BackgroundSaveError: an earlier async save failed.
    """
    started = time.perf_counter()
    step = _check_step(step)
    writer = self._writer()
    writer.poll()
    if self._rt.writer_lock is not None:
      self._rt.writer_lock.check()
    layout = items_lib.layout_of(state)
    writes = _item_writes(layout)
    json_metrics = self._check_metrics(metrics, step)
    _check_tag(tag)
    if self._step_exists(step):
      if force:
        log.info("Step %d already exists in %s: not saved again.", step, self.directory)
        return False
      raise StepAlreadyExistsError(
          f"Step {step} already exists in {self.directory}; kckpt never overwrites a step."
          f" Delete it first (ckpt.delete({step})) or pass force=True to skip it."
      )
    rt = self._rt
    now = time.time()
    rt.records[step] = policies.StepRecord(step=step, time=now, metrics=json_metrics)
    telemetry = _SaveTelemetry(
        rt, self.directory, step=step, nbytes=_pytree_nbytes(writes), started=started, async_save=self.async_save
    )
    try:
      custom = {steps_lib.KCKPT_METADATA_KEY: {"tag": tag}} if tag is not None else None
      writer.save(step, writes, json_metrics, custom_metadata=custom, on_durable=telemetry.durable)
    except BaseException:
      rt.records.pop(step, None)
      raise
    finally:
      rt.listing = None
    rt.last_save_time = now
    if not self.async_save:
      writer.wait()
    telemetry.returned(time.perf_counter())
    return True

  def maybe_save(
      self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None, tag: str | None = None
  ) -> bool:
    """Saves when `should_save(step)`, or when `force` (unless the step exists).

    Also raises the error of a failed background save, if any. After a
    preemption notice (SIGTERM, `request_preemption`) it saves `step` even
    off the interval, waits until it is durable and sets
    `reached_preemption`; from then on it saves nothing.

    In a multi-process run every process must call it at every step: the
    processes share at each call whether any was preempted, the primary's
    clock for `save_interval_secs` and whether a background save failed (one
    small exchange through JAX's coordination service).
    """
    step = _check_step(step)
    rt = self._rt
    if rt.reached_preemption:
      return False
    if self.handle_sigterm and self.create and rt.sigterm_handler is None and multihost.install_sigterm_handler():
      rt.sigterm_handler = weakref.finalize(self, multihost.uninstall_sigterm_handler)
    writer = rt.writer
    decision = multihost.vote(
        multihost.StepVote(
            preempt=rt.preemption_requested or (rt.sigterm_handler is not None and multihost.sigterm_received()),
            time_due=self._time_rule_applies(step) and self._time_due(),
            save_done=writer is not None and writer.in_flight_step is not None and not writer.is_busy(),
        ),
        timeout_secs=self.barrier_timeout_secs,
        what=f"maybe_save(step={step})",
    )
    if decision.save_done and writer is not None:
      self.wait_until_finished()  # raises a background error, on every process
    if decision.preempt:
      return self._save_for_preemption(state, step=step, metrics=metrics, tag=tag)
    if force or self._should_save(step, time_due=decision.time_due):
      return self.save(state, step=step, force=True, metrics=metrics, tag=tag)
    return False

  def request_preemption(self) -> None:
    """Asks the run to stop as SIGTERM does: save now, then exit the loop.

    The next `maybe_save` saves its step on every process (even off the
    interval), waits until it is durable and sets `reached_preemption`.
    Calling it on one process is enough; it is safe from any thread (e.g. a
    watcher of the scheduler's preemption notices).

    >>> import tempfile, numpy as np
    >>> ckpt = Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=100, handle_sigterm=False)
    >>> ckpt.request_preemption()
    >>> for step in range(1, 1000):
    ...   _ = ckpt.maybe_save({"w": np.ones(2)}, step=step)
    ...   if ckpt.reached_preemption:
    ...     break
    >>> step, ckpt.all_steps
    (1, [1])
    >>> ckpt.close()
    """
    self._rt.preemption_requested = True

  @property
  def reached_preemption(self) -> bool:
    """True once `maybe_save` saved for a preemption: the training loop should exit.

    Resuming is the usual ``ckpt.restore(state, noop_if_missing=True)``: the
    step saved for the preemption is the latest.
    """
    return self._rt.reached_preemption

  def _save_for_preemption(self, state: Any, *, step: Step, metrics: Metrics | None, tag: str | None = None) -> bool:
    saved = self.save(state, step=step, force=True, metrics=metrics, tag=tag)
    self.wait_until_finished()
    self._rt.reached_preemption = True
    log.warning("Preemption: step %d is saved in %s; reached_preemption is True, the loop should exit.",
                step, self.directory)
    return saved

  def _check_metrics(self, metrics: Metrics | None, step: Step) -> Any:
    if metrics is None:
      return None
    try:
      json_metrics = policies.to_json_metrics(metrics)
    except ValueError as e:
      raise ValueError(f"save(step={step}): {e}") from None
    if not isinstance(json_metrics, Mapping):
      raise ValueError(f"save(step={step}): metrics must be a dict, got {type(metrics).__name__}")
    try:
      if self.best_metric_path is not None:
        policies.as_score(
            policies.metric_at_path(json_metrics, self.best_metric_path), what=f"metric {self.best_metric_path!r}"
        )
      elif self.best_fn is not None:
        policies.as_score(self.best_fn(json_metrics), what="best_fn(metrics)")
    except KeyError as e:
      raise ValueError(f"save(step={step}): {e.args[0]}") from None
    except ValueError as e:
      raise ValueError(f"save(step={step}): {e}") from None
    return json_metrics

  def _record(self, step: Step) -> policies.StepRecord:
    """What retention needs of `step`, read from disk once when not known."""
    rt = self._rt
    record = rt.records.get(step)
    if record is None:
      policy = self.retention_policy
      path = steps_lib.step_dir(self.directory, step)
      metrics = steps_lib.read_step_metrics(path) if policy.ranks_by_metric else None
      when = steps_lib.read_step_time(path) if policy.keep_time_interval_secs else None
      record = policies.StepRecord(step=step, time=when.timestamp() if when else None, metrics=metrics)
      rt.records[step] = record
    return record

  def _decide_preservation(self, known_steps: Sequence[Step]) -> list[bool]:
    records = [self._record(s) for s in known_steps]
    decisions = {d.step: d.keep for d in policies.decide_retention(self.retention_policy, records)}
    for step, keep in decisions.items():
      if not keep:
        self._rt.records.pop(step, None)
    return [decisions[s] for s in known_steps]

  def retention(self) -> list[policies.KeepDecision]:
    """For each finished step, whether the retention rules keep it, and why.

    Reads each step's metrics and time (only as the rules need them).

    >>> import tempfile, numpy as np
    >>> ckpt = Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=1, max_to_keep=2, async_save=False)
    >>> for s in range(3):
    ...   _ = ckpt.save({"x": np.zeros(1)}, step=s)
    >>> [(d.step, d.reasons) for d in ckpt.retention()]
    [(1, ('latest',)), (2, ('newest', 'latest'))]
    """
    return policies.decide_retention(self.retention_policy, [self._record(s) for s in self._listing(fresh=True).finished])

  def delete(self, step: Step) -> None:
    """Removes one finished step (an error with `create=False`)."""
    step = _check_step(step)
    writer = self._writer()
    if step not in self._listing(fresh=True).finished:
      raise CheckpointNotFoundError(
          f"Cannot delete step {step}: not in {self.directory} (steps: {steps_lib.steps_repr(self.all_steps)})",
          available_steps=self.all_steps,
      )
    writer.delete(step)
    self._rt.records.pop(step, None)
    self.reload()

  def delete_all_steps(self) -> list[Step]:
    """Starts the run over: deletes every step folder (and leftovers of crashed saves).

    Explicit and never automatic (a preempted job that restarts must not wipe
    its progress). Only ``ckpt_<step>`` folders of this layout and their
    temporary folders are removed; other files in the workdir are left alone.

    Returns:
      The steps that were deleted.
    """
    writer = self._writer()
    writer.wait()
    listing = self._listing(fresh=True)
    for step in listing.finished:
      writer.delete(step)
      self._rt.records.pop(step, None)
    if multihost.is_primary():
      for name in listing.unfinished:
        (self.directory / name).rmtree(missing_ok=True)
    markers.clear_end_marker(self.workdir)
    self.reload()
    return list(listing.finished)

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save is durable; raises its error, naming the step."""
    writer = self._rt.writer
    if writer is not None:
      try:
        writer.wait()
      finally:
        self.reload()

  def close(self) -> None:
    """Waits for pending saves and releases the Orbax manager (reopened if used again)."""
    rt = self._rt
    with rt.lock:
      writer, rt.writer = rt.writer, None
      writer_lock, rt.writer_lock = rt.writer_lock, None
    if rt.sigterm_handler is not None:
      rt.sigterm_handler()  # the last one restores the handler there was before
      rt.sigterm_handler = None
    try:
      if writer is not None:
        writer.close()
    finally:
      if writer_lock is not None:
        writer_lock.release()
      self.reload()

  # -- Restoring ------------------------------------------------------------

  def _resolve_step(self, step: StepSpec) -> Step | None:
    """The step number that `step` names, or None when the run has no step."""
    if isinstance(step, str):
      if step == "latest":
        step = -1
      elif step == "best":
        return self.best_step
      else:
        return self._step_with_tag(step)
    if step == -1:
      return self._fresh_latest()
    return _check_step(step)

  def _step_with_tag(self, tag: str) -> Step:
    """The newest step saved with `tag` (reads the small metadata file of steps, newest first)."""
    finished = self._listing(fresh=True).finished
    for step in reversed(finished):
      if steps_lib.step_tag(steps_lib.read_step_metadata(steps_lib.step_dir(self.directory, step))) == tag:
        return step
    raise CheckpointNotFoundError(
        f"No step of {self.directory} has the tag {tag!r} (steps: {steps_lib.steps_repr(finished)});"
        " step must be an int, -1, 'latest', 'best' or a tag given to save",
        available_steps=finished,
    )

  def _fresh_latest(self) -> Step | None:
    finished = self._listing(fresh=True).finished
    return self._agreed_step(finished[-1] if finished else None, what="finding the latest step")

  @property
  def best_step(self) -> Step | None:
    """The best step by `best_metric_path` / `best_fn`, or None.

    Without a best metric, the newest step.
    """
    policy = self.retention_policy
    finished = self._listing(fresh=True).finished
    if not policy.ranks_by_metric:
      return finished[-1] if finished else None
    scored = [(policy.score(self._record(s).metrics), s) for s in finished]
    scored = [(score, s) for score, s in scored if score is not None]
    if not scored:
      return None
    sign = 1 if self.best_mode == "max" else -1
    return max(scored, key=lambda p: (sign * p[0], p[1]))[1]

  def _require_step(self, step: StepSpec) -> Step:
    resolved = self._resolve_step(step)
    if resolved is None:
      raise CheckpointNotFoundError(
          f"No checkpoint found in {self.directory}. Use `noop_if_missing=True` to keep the initial state."
      )
    finished = self._listing(fresh=resolved not in self._listing().finished).finished
    if resolved not in finished:
      raise CheckpointNotFoundError(
          f"Step {resolved} is not in {self.directory} (steps: {steps_lib.steps_repr(finished)})",
          available_steps=finished,
      )
    return resolved

  def restore(
      self,
      state: Any = None,
      *,
      step: StepSpec = -1,
      noop_if_missing: bool = False,
      donate: bool = True,
      partial: bool = False,
  ) -> Any:
    """Restores a step into the structure, shapes, dtypes and shardings of `state`.

    Args:
      state: the target: a pytree (arrays may be `jax.ShapeDtypeStruct`), a
        `CheckpointItem`, a `Composite` (only its names are read) or a
        `TopLevelCheckpointItem`. None returns the saved tree as NumPy
        arrays (the ``default`` item, or a `Composite` of all items).
      step: the step; -1 or ``"latest"`` for the newest, ``"best"`` for the
        best by the configured metric.
      noop_if_missing: when the run has no checkpoint at all, return `state`
        unchanged instead of raising. A named step that is missing always
        raises.
      donate: free the arrays of `state` before reading, so memory does not
        double; done only once the step exists and the tree matches.
      partial: restore the leaves that both the target and the checkpoint
        have, and return the target's other leaves as they were (e.g. a new
        layer added since the checkpoint). Only those leaves are read; a
        shape mismatch on a common leaf is still an error.

    Raises:
      CheckpointNotFoundError: (a `FileNotFoundError`) no such step.
      TreeMismatchError: (a `ValueError`) listing every missing, unexpected
        and mis-shaped leaf by its pytree path.
    """
    started = time.perf_counter()
    if self._rt.writer is not None:
      self._rt.writer.wait()
    if noop_if_missing and step in (-1, "latest") and self._fresh_latest() is None:
      return state
    step = self._require_step(step)
    if multihost.process_count() > 1:  # Orbax's restore ends with a barrier that has no timeout
      multihost.barrier("restore", timeout_secs=self.barrier_timeout_secs, what=f"restore(step={step})")
    step_path = steps_lib.step_dir(self.directory, step)
    try:
      return self._restore_step(state, step, step_path, donate=donate, partial=partial, started=started)
    except (CheckpointReadError, FileNotFoundError) as e:
      if not step_path.exists():  # e.g. the trainer's retention removed it mid-read
        raise CheckpointNotFoundError(
            f"Step {step} was deleted from {self.directory} while it was being restored"
        ) from e
      raise

  def _restore_step(
      self, state: Any, step: Step, step_path: epath.Path, *, donate: bool, partial: bool, started: float | None = None
  ) -> Any:
    saved_items = steps_lib.read_item_names(step_path)
    if not any(name not in steps_lib.RESERVED_ITEMS for name in saved_items):
      raise CheckpointReadError(
          f"Cannot read step {step} of {self.directory}: {step_path} holds no checkpoint item"
          " (no _CHECKPOINT_METADATA and no item folder)",
          step=step,
      )
    layout = _restore_layout(state, saved_items)
    reads, problems = [], []
    common: dict[str, set[str]] = {}  # partial restore: item -> paths read
    for name, item in layout.items.items():
      if name not in saved_items:
        problems.append(f"{name}: no such item in step {step} (it has: {sorted(n for n in saved_items if n not in steps_lib.RESERVED_ITEMS)})")
        continue
      fmt = _orbax.item_format(saved_items[name]) if item is None else item.format
      target = None if item is None or fmt == "json" else item.restore_target()
      if target is not None:
        with _reading(step, name, step_path / name):
          saved = _orbax.saved_leaf_specs(step_path / name)
        wanted = {path: trees.leaf_spec(leaf) for path, leaf in trees.flatten_with_paths(target).items()}
        prefix = "" if layout.kind == "single" else f"{name}/"
        if partial:
          common[name] = saved.keys() & wanted.keys()
          saved = {p: saved[p] for p in common[name]}
          wanted = {p: wanted[p] for p in common[name]}
        problems.extend(trees.compare_trees(saved, wanted, prefix=prefix))
      reads.append((name, item, fmt, target))
    if problems:
      raise TreeMismatchError(
          f"Cannot restore step {step} of {self.directory}: the target does not match the checkpoint"
          f" ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  " + "\n  ".join(problems)
          + "\nTo restore only some items, ask for them by name with kckpt.items.Composite(name=...);"
          " to keep target leaves the checkpoint lacks, pass partial=True.",
          problems=problems,
      )
    restored = {}
    # Items read as saved (JSON, or no target) in one Orbax call.
    as_saved = [(name, fmt) for name, _, fmt, target in reads if target is None]
    if as_saved:
      with _reading(step, ", ".join(name for name, _ in as_saved), step_path):
        raw = _orbax.read_items(
            step_path, [_orbax.ItemRead(name=name, format=fmt) for name, fmt in as_saved], storage=self.storage
        )
      restored.update(raw)
    for name, item, _, target in reads:
      if target is not None:
        with _reading(step, name, step_path / name):
          if name in common:  # partial: read the leaves both trees have, keep the target's others
            leaves = trees.flatten_with_paths(target)
            abstract = {p: _orbax.abstract_target(leaves[p]) for p in common[name]}
            if donate:
              _orbax.release([leaves[p] for p in common[name]])
            value = trees.replace_leaves(target, _orbax.read_leaves(step_path / name, abstract) if abstract else {})
          else:
            value = _orbax.read_tree_into(step_path / name, target, donate=donate, storage=self.storage)
        restored[name] = _orbax.match_scalar_types(target, value)
    if started is not None:
      nbytes = sum(trees.tree_nbytes(restored[name]) for name, _, fmt, _ in reads if fmt == "pytree")
      self._record_restore_stats(step, nbytes, started)
    for name, item, _, _ in reads:
      if item is not None:
        restored[name] = item.from_restored(restored[name])
    return layout.rebuild({name: restored[name] for name, _, _, _ in reads})

  def item_metadata(self, step: StepSpec = -1) -> Any:
    """Shapes and dtypes of the saved leaves (`jax.ShapeDtypeStruct`), no array read.

    The ``default`` item's tree when the step has one, else a `Composite`
    with one tree per pytree item.
    """
    step = self._require_step(step)
    step_path = steps_lib.step_dir(self.directory, step)
    saved_items = steps_lib.read_item_names(step_path)
    pytree_items = [n for n, h in saved_items.items() if n not in steps_lib.RESERVED_ITEMS and _orbax.item_format(h) == "pytree"]
    if steps_lib.DEFAULT_ITEM in pytree_items:
      return _orbax.metadata_as_shape_dtype(step_path / steps_lib.DEFAULT_ITEM)
    return items_lib.Composite(**{n: _orbax.metadata_as_shape_dtype(step_path / n) for n in pytree_items})

  def metrics(self, step: StepSpec = -1) -> Mapping[str, Any] | None:
    """The metrics saved with `step` (None when it was saved without)."""
    step = self._require_step(step)
    return steps_lib.read_step_metrics(steps_lib.step_dir(self.directory, step))

  def step_details(self, step: StepSpec = -1) -> steps_lib.StepDetails:
    """Time, metrics and items of one step (reads its small files, no arrays)."""
    return steps_lib.read_step_details(self.directory, self._require_step(step))

  # -- Telemetry ------------------------------------------------------------

  @property
  def last_save_stats(self) -> storage_lib.TransferStats | None:
    """Bytes, seconds, MB/s and blocked time of the newest save of this instance (None before one).

    For an async save, `seconds` and `mb_per_s` are None until the step is
    durable; they are filled in the moment Orbax's background save finishes
    (the step renamed into place), and are always complete once
    `wait_until_finished()`, `close()`, the next `save` or a `restore` returned.
    """
    return self._rt.save_stats

  @property
  def last_restore_stats(self) -> storage_lib.TransferStats | None:
    """Bytes, seconds, MB/s of the newest `restore` of this instance (None before one)."""
    return self._rt.restore_stats

  def _record_restore_stats(self, step: Step, nbytes: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    stats = storage_lib.TransferStats(operation="restore", step=step, bytes=nbytes, blocked_seconds=elapsed, seconds=elapsed)
    self._rt.restore_stats = stats
    log.info("kckpt %s [%s]", stats.describe(), self.directory)

  # -- Looking at a run -----------------------------------------------------

  def _summary_rows(self, max_rows: int) -> tuple[steps_lib.StepListing, list[steps_lib.StepDetails]]:
    listing = self._listing(fresh=True)
    shown = listing.finished[-max_rows:][::-1]
    details = []
    for step in shown:
      try:
        details.append(steps_lib.read_step_details(self.directory, step))
      except FileNotFoundError:
        continue  # deleted since the listing
    return listing, details

  def summary(self, *, max_rows: int = 10) -> str:
    """A few lines on the run: its steps, and the newest ones with time and metrics.

    Reads one listing and the small files of at most `max_rows` steps; no array.
    """
    listing, details = self._summary_rows(max_rows)
    lines = [f"{self.directory}: {len(listing.finished)} step(s) {steps_lib.steps_repr(listing.finished)}"]
    if listing.unfinished:
      lines.append(f"  being written (or left by a crash): {', '.join(listing.unfinished)}")
    for d in details:
      when = d.time.strftime("%Y-%m-%d %H:%M:%S UTC") if d.time else "?"
      metrics = _flat_metrics(d.metrics)
      tag = f"  tag: {d.tag}" if d.tag else ""
      lines.append(f"  step {d.step:>8}  {when}  items: {', '.join(d.user_items)}{tag}" + (f"  {metrics}" if metrics else ""))
    return "\n".join(lines)

  def _repr_html_(self) -> str:
    """Notebook view: the steps, and the newest ones with time and metrics (no array read)."""
    import html  # pylint: disable=g-import-not-at-top

    if self.workdir is None:
      return f"<pre>{html.escape(repr(self))}</pre>"
    listing, details = self._summary_rows(10)
    rows = "".join(
        f"<tr><td>{d.step}</td><td>{html.escape(d.time.strftime('%Y-%m-%d %H:%M:%S UTC') if d.time else '?')}</td>"
        f"<td>{html.escape(', '.join(d.user_items))}</td><td>{html.escape(_flat_metrics(d.metrics))}</td></tr>"
        for d in details
    )
    return (
        f"<div><b>kckpt.Checkpointer</b> <code>{html.escape(str(self.directory))}</code><br>"
        f"{len(listing.finished)} step(s): {html.escape(steps_lib.steps_repr(listing.finished))}"
        + (f"; being written: {html.escape(', '.join(listing.unfinished))}" if listing.unfinished else "")
        + "<table><tr><th>step</th><th>saved</th><th>items</th><th>metrics</th></tr>"
        + rows
        + "</table></div>"
    )

  # -- Watching -------------------------------------------------------------

  def iter_new_checkpoints(
      self,
      *,
      min_interval_secs: float = 0,
      timeout: float | None = None,
      timeout_fn: Callable[[], bool] | None = None,
      poll_interval_secs: float = 1.0,
      after: Step | None = None,
      only_newest: bool = False,
  ) -> Iterator[Step]:
    """Yields each new finished step as it appears (for an eval job in another process).

    Starts with the newest step that exists now (or the first after `after`),
    then every later step in order. Polls one directory listing; copies and
    writes nothing, so it works with `create=False` on a read-only folder.

    Args:
      min_interval_secs: at least this long between two yields.
      timeout: stop after this many seconds without a new step, once
        `timeout_fn()` is true (or when there is no `timeout_fn`).
      timeout_fn: e.g. `trainer_finished` ("the trainer wrote its end
        marker"). With no `timeout`, the loop ends as soon as it is true and
        every step is yielded.
      poll_interval_secs: sleep between listings.
      after: yield only steps after this one (``after=-1``: every step from
        the first, e.g. for an eval job that must see them all).
      only_newest: at each poll, yield only the newest new step (for an
        evaluator slower than the trainer).
    """

    def list_finished() -> Sequence[Step]:
      return self._listing(fresh=True).finished

    yield from watch.new_steps(
        list_finished,
        after=after,
        min_interval_secs=min_interval_secs,
        timeout=timeout,
        timeout_fn=timeout_fn,
        poll_interval_secs=poll_interval_secs,
        only_newest=only_newest,
    )


@contextlib.contextmanager
def _reading(step: Step, item: str, path: epath.Path) -> Iterator[None]:
  """Turns an error of Orbax/TensorStore while reading into one that names the step and item."""
  try:
    yield
  except (CheckpointReadError, TreeMismatchError):
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointReadError(
        f"Cannot read step {step}, item {item!r} at {path}: {type(e).__name__}: {e}", step=step, item=item
    ) from e


def _check_tag(tag: str | None) -> None:
  if tag is None:
    return
  if not isinstance(tag, str) or not tag or tag in ("latest", "best") or tag.lstrip("-").isdigit():
    raise ValueError(f"tag must be a non-empty name other than 'latest', 'best' or a number, got {tag!r}")


def _flat_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> str:
  if not metrics:
    return ""
  parts = []
  for key, value in metrics.items():
    if isinstance(value, Mapping):
      parts.append(_flat_metrics(value, f"{prefix}{key}."))
    else:
      parts.append(f"{prefix}{key}={value:.4g}" if isinstance(value, float) else f"{prefix}{key}={value}")
  return " ".join(p for p in parts if p)


def _item_writes(layout: items_lib.Layout) -> list[_orbax.ItemWrite]:
  writes = []
  for name, item in layout.items.items():
    if item is None:
      raise ValueError(f"item {name!r} is None: nothing to save")
    value = item.checkpoint_value()
    if item.format == "json":
      items_lib.check_json(value, name=name)
    else:
      bad = trees.unsaveable_leaves(value)
      if bad:
        where = "" if layout.kind == "single" else f"item {name!r}: "
        raise ValueError(
            f"{where}cannot save these leaves (a pytree of arrays, NumPy values and Python scalars is expected):\n  "
            + "\n  ".join(bad)
        )
      if not jax.tree.leaves(value) and layout.kind == "single":
        raise ValueError(f"cannot save {type(value).__name__}: it has no array or scalar leaves")
    writes.append(_orbax.ItemWrite(name=name, format=item.format, value=value))
  return writes


def _restore_layout(state: Any, saved_items: Mapping[str, str]) -> items_lib.Layout:
  if state is not None:
    return items_lib.layout_of(state)
  if steps_lib.DEFAULT_ITEM in saved_items:
    return items_lib.Layout({steps_lib.DEFAULT_ITEM: None}, "single")
  names = [n for n in saved_items if n not in steps_lib.RESERVED_ITEMS]
  return items_lib.Layout({n: None for n in names}, "composite")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoopCheckpointer(BaseCheckpointer):
  """A checkpointer that saves nothing: `restore` returns `state`, saves return False.

  >>> NoopCheckpointer().save({"w": 1}, step=1)
  False
  """

  def restore(self, state: Any = None, *, step: StepSpec = -1, noop_if_missing: bool = False, donate: bool = True) -> Any:
    del step, noop_if_missing, donate
    return state

  def should_save(self, step: Step) -> bool:
    return False

  def save(self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None) -> bool:
    del state, step, force, metrics
    return False

  def maybe_save(self, state: Any, *, step: Step, force: bool = False, metrics: Metrics | None = None) -> bool:
    del state, step, force, metrics
    return False


def _pytree_nbytes(writes: Sequence[_orbax.ItemWrite]) -> int:
  return sum(trees.tree_nbytes(w.value) for w in writes if w.format == "pytree")


class _SaveTelemetry:
  """Builds a save's `TransferStats` from two moments: `save` returned, and the step is durable.

  For an async save the second comes from a background thread, possibly
  before the first (a tiny save); the stats are published at the first moment
  and completed (and logged) once both are known.
  """

  def __init__(self, rt: _Runtime, directory: epath.Path, *, step: Step, nbytes: int, started: float, async_save: bool):
    self._rt, self._directory = rt, directory
    self._step, self._nbytes, self._started, self._async = step, nbytes, started, async_save
    self._returned: float | None = None
    self._durable: float | None = None
    self._lock = threading.Lock()

  def returned(self, now: float) -> None:
    with self._lock:
      self._returned = now
      self._publish()

  def durable(self, now: float) -> None:
    with self._lock:
      self._durable = now
      if self._returned is not None:
        self._publish()

  def _publish(self) -> None:
    assert self._returned is not None
    stats = storage_lib.TransferStats(
        operation="save",
        step=self._step,
        bytes=self._nbytes,
        blocked_seconds=self._returned - self._started,
        seconds=None if self._durable is None else self._durable - self._started,
        async_save=self._async,
    )
    self._rt.save_stats = stats
    if stats.done:
      log.info("kckpt %s [%s]", stats.describe(), self._directory)
