"""The `Checkpointer` users hold: a frozen config whose methods save, keep and restore with Orbax.

Its public methods delegate: `kckpt._run` lists and names steps,
`kckpt._session` is the open writer, `kckpt._restore` reads a step into a
target, `kckpt.policies` decides. The interface, and `NoopCheckpointer` that
saves nothing, are in `kckpt.base` (and importable from here).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import html
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from etils import epath

from kckpt import _config
from kckpt import _local_tier
from kckpt import _orbax
from kckpt import _restore
from kckpt import _run
from kckpt import _session
from kckpt import _views
from kckpt import base
from kckpt import inspect
from kckpt import multihost
from kckpt import policies
from kckpt import storage as storage_lib
from kckpt import telemetry
from kckpt import watch
from kckpt._types import Metrics, PathLike, Step, StepSpec
from kckpt.errors import ReadOnlyCheckpointerError

# The interface and the no-op checkpointer, importable from here as in the first release.
BaseCheckpointer = base.BaseCheckpointer
NoopCheckpointer = base.NoopCheckpointer

log = logging.getLogger("kckpt")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpointer(base.BaseCheckpointer):
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
      `wait_until_finished`, `close`, `restore`) before raising
      `ProcessTimeoutError`: a process that died or is stuck never makes the
      others hang.
    handle_sigterm: on SIGTERM (a preemption notice), do not die at once: the
      next `maybe_save` saves the current step on every process and sets
      `reached_preemption` (see `request_preemption`); then the SIGTERM is
      honoured as the handler before kckpt's would have (the default: the
      next `maybe_save` raises ``SystemExit(143)``). The handler is installed
      by the first `maybe_save` and removed by `close`.
    storage: `kckpt.StorageOptions`: the on-disk format (compression, OCDBT,
      Zarr version, checksums) and I/O concurrency limits of saves. The
      default: uncompressed, OCDBT, Zarr v2, a CRC32C per saved shard;
      ``StorageOptions.orbax_defaults()`` writes what plain Orbax writes.
      Restores read any format.
    health_fn: an optional function of a step's metrics (the dict given to
      `save`, or None) that returns whether the step is healthy ("loss is
      finite and below 10"). A step whose floating arrays hold NaN or
      infinity is unhealthy too. Unhealthy steps are saved, and marked: the
      newest healthy step is always kept (besides the other rules) and
      ``restore(step="last_good")`` restores it.
    s3_endpoint: for ``s3://`` workdirs, the S3 endpoint URL (MinIO, R2...),
      overriding ``AWS_ENDPOINT_URL``; applies to the whole process (see
      `kckpt.cloud`).
    s3_region: for ``s3://`` workdirs, the region, overriding ``AWS_REGION``
      / ``AWS_DEFAULT_REGION``; applies to the whole process.
    local_workdir, local_save_interval_steps, local_max_to_keep, local_replicas:
      a fast local tier (see the multi-tier guide): `maybe_save` also saves
      each process's shards every `local_save_interval_steps` into its folder
      (``{process_index}`` replaced, else ``process_<index>`` appended) and
      into the folders of `local_replicas` other processes, keeping
      `local_max_to_keep` steps. Readers of `workdir` never see them
      (`local_steps` lists them); ``restore()`` takes the newest of either
      tier. The other three are ignored while `local_workdir` is None.

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
  max_to_keep: int | None = policies.DEFAULT_MAX_TO_KEEP
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
  health_fn: Callable[[Metrics | None], bool] | None = None
  s3_endpoint: str | None = None
  s3_region: str | None = None
  local_workdir: PathLike | None = None
  local_save_interval_steps: int | None = None
  local_max_to_keep: int = 2
  local_replicas: int = 1

  def __post_init__(self):
    _config.validate(self)

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
    return cls(**_config.constructor_kwargs(cls, config))

  @classmethod
  def open(cls, workdir: PathLike, **kwargs: Any) -> Checkpointer:
    """A read-only `Checkpointer` on an existing run (for notebooks and eval jobs).

    Its retention rules are those the run's writer recorded (so `retention()`,
    `best_step` and ``"best"`` agree with the writer), unless `kwargs` give some.

    >>> import tempfile
    >>> Checkpointer.open(tempfile.mkdtemp()).all_steps
    []
    """
    return _config.open_read_only(cls, workdir, kwargs)

  # -- Runtime state (never configuration) ------------------------------------

  @functools.cached_property
  def _rt(self) -> _session.Runtime:
    return _session.Runtime()

  @functools.cached_property
  def _index(self) -> _run.RunIndex:
    return _run.RunIndex(self.directory, retention=self.retention_policy)

  def __getstate__(self) -> dict[str, Any]:
    """Copies and pickles carry the configuration only, never the open writer or caches."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    for name, value in state.items():
      object.__setattr__(self, name, value)

  @property
  def directory(self) -> epath.Path:
    """``<workdir>/checkpoints``; raises ValueError while `workdir` is None."""
    return _config.checkpoints_dir(self)

  @property
  def save_policy(self) -> policies.SavePolicy:
    return _config.save_policy(self)

  @property
  def retention_policy(self) -> policies.RetentionPolicy:
    return _config.retention_policy(self)

  def _session(self) -> _session.WriteSession:
    """The open writer, opened at the first write (and again after `close`)."""
    if not self.create:
      raise ReadOnlyCheckpointerError(
        f"This Checkpointer of {self.workdir} is read-only (create=False): it never saves or deletes."
      )
    rt = self._rt
    with rt.lock:
      if rt.session is None:
        rt.session = _session.WriteSession(self, self._index, rt)
      return rt.session

  def _in_flight(self) -> bool:
    session = self._rt.session
    return session is not None and session.in_flight_step is not None

  # -- Listing (local reads: any process may call them alone) -----------------

  @property
  def all_steps(self) -> list[Step]:
    """The finished steps, sorted (cached until `reload()` or a save)."""
    return list(self._index.finished(fresh=self._in_flight()))

  @property
  def latest_step(self) -> Step | None:
    """The newest finished step, or None (this process's listing: no other process is asked)."""
    finished = self._index.finished(fresh=self._in_flight())
    return finished[-1] if finished else None

  @property
  def local_steps(self) -> list[Step]:
    """This process's steps in the local tier (`local_workdir`), sorted; [] without one."""
    tier = self._local_tier()
    return [] if tier is None else tier.steps()

  def _local_tier(self) -> _local_tier.LocalTier | None:
    return None if self.local_workdir is None else self._rt.local(lambda: _config.local_tier(self))

  def reload(self) -> None:
    """Forgets the cached step list, so the next call lists the folder again."""
    self._index.invalidate()

  @property
  def best_step(self) -> Step | None:
    """The best step by `best_metric_path` / `best_fn` (None when none is scored); without one, the newest."""
    return self._index.best_step()

  def metrics(self, step: StepSpec = -1) -> Mapping[str, Any] | None:
    """The metrics saved with `step` (None when it was saved without)."""
    return self._index.details(step).metrics

  def step_details(self, step: StepSpec = -1) -> _run.StepDetails:
    """Time, metrics, items and tag of one step (reads its small files, no arrays)."""
    return self._index.details(step)

  def item_metadata(self, step: StepSpec = -1) -> Any:
    """Shapes and dtypes of the saved leaves (`jax.ShapeDtypeStruct`), no array read.

    The ``default`` item's tree when the step has one, else a `Composite`
    with one tree per pytree item.
    """
    return _restore.saved_shapes(self._index.details(step))

  def tree(self, step: StepSpec = -1) -> inspect.TreeView:
    """The saved trees of `step` (each leaf's shape, dtype, bytes, sharding, statistics); no array read."""
    return _views.step_tree(self._index.details(step))

  def diff(self, a: StepSpec, b: StepSpec = -1, *, other: PathLike | Checkpointer | None = None) -> inspect.Diff:
    """Steps `a` and `b` (of the run `other` when given) compared leaf by leaf, as ``kckpt diff`` does."""
    theirs = self if other is None else other if isinstance(other, Checkpointer) else Checkpointer.open(other)
    return _views.diff(self._index.details(a), theirs._index.details(b))

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
    finished = self._index.finished(fresh=True)
    return policies.decide_retention(self.retention_policy, self._index.records(finished), is_healthy=self._index.healthy)

  # -- Saving -----------------------------------------------------------------

  def should_save(self, step: Step) -> bool:
    """Whether `maybe_save` would save at `step` (False if it already exists).

    Local: `save_interval_secs` is judged on this process's clock (in
    `maybe_save`, the primary's clock decides for every process).
    """
    step = _run.check_step(step)
    return self._should_save(step, time_due=self._time_due(step))

  def _time_due(self, step: Step) -> bool:
    return self._rt.time_due(self.save_policy, step)

  def _should_save(self, step: Step, *, time_due: bool) -> bool:
    return self._rt.should_save(self.save_policy, step, time_due=time_due, index=self._index)

  def save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
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
      config: the run's configuration (JSON: a dict of numbers, strings,
        lists...), recorded in the step's provenance
        (``step_details(step).provenance["config"]``, ``kckpt diff``).

    Returns:
      True when a save was started; False when `force` and the step exists.

    Raises:
      StepAlreadyExistsError: the step exists and `force` is False.
      ValueError: the state holds a leaf that cannot be saved, a JSON item is
        not serialisable, or the metrics lack the best metric.
      BackgroundSaveError: an earlier async save failed.
    """
    step = _run.check_step(step)
    session = self._session()
    return session.save(
      state,
      step=step,
      force=force,
      metrics=policies.check_metrics(metrics, self.retention_policy, what=f"save(step={step})"),
      tag=tag,
      config=config,
    )

  def maybe_save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves when `should_save(step)`, or when `force` (unless the step exists).

    Also raises the error of a failed background save, if any. After a
    preemption notice (SIGTERM, `request_preemption`) it saves `step` even
    off the interval, waits until it is durable and sets
    `reached_preemption`; from then on it saves nothing. After a SIGTERM
    whose default action kckpt held back, the next call raises
    ``SystemExit(143)``: a loop that does not check `reached_preemption`
    still ends, as SIGTERM means.

    In a multi-process run every process must call it at every step: the
    processes share at each call whether any was preempted, the primary's
    clock, failed saves and the local tier's copy to peers (one small
    exchange through JAX's coordination service).
    """
    step = _run.check_step(step)
    rt = self._rt
    if rt.preemption.reached:
      rt.preemption.check_exit()  # a loop that did not stop: SIGTERM's default action, now
      return False
    if self.handle_sigterm and self.create:
      rt.preemption.handle_sigterm(self)
    decision = rt.vote(step, time_due=self._time_due(step), timeout_secs=self.barrier_timeout_secs)  # moves the copy on
    if decision.save_done:
      rt.wait_persistent()  # raises a background error, on every process
    if decision.preempt:
      saved = self.save(state, step=step, force=True, metrics=metrics, tag=tag, config=config)
      self.wait_until_finished()
      log.warning("Preemption: step %d is saved in %s; reached_preemption is True, the loop should exit.", step, self.directory)
      rt.preemption.saved(exit_all=decision.exit_after)
      return saved
    due = force or self._should_save(step, time_due=decision.time_due)
    saved = due and self.save(state, step=step, force=True, metrics=metrics, tag=tag, config=config)
    if (tier := self._local_tier() if self.create else None) and tier.due(step):
      tier.save(state, step, async_save=self.async_save, metrics=metrics, health_fn=self.health_fn)  # every process
    return saved

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
    self._rt.preemption.requested = True

  @property
  def reached_preemption(self) -> bool:
    """True once `maybe_save` saved for a preemption: the training loop should exit.

    Resuming is the usual ``ckpt.restore(state, noop_if_missing=True)``: the
    step saved for the preemption is the latest.
    """
    return self._rt.preemption.reached

  def delete(self, step: Step) -> None:
    """Removes one finished step (an error with `create=False`)."""
    self._session().delete(_run.check_step(step))

  def delete_all_steps(self) -> list[Step]:
    """Starts the run over: deletes every step folder (and leftovers of crashed saves).

    Explicit and never automatic (a preempted job that restarts must not wipe
    its progress). Only ``ckpt_<step>`` folders of this layout and their
    temporary folders are removed; other files in the workdir are left alone.

    Returns:
      The steps that were deleted.
    """
    session = self._session()  # raises first on a read-only Checkpointer
    if (tier := self._local_tier()) is not None:
      tier.clear()
    return session.delete_all()

  def wait_until_finished(self) -> None:
    """Blocks until the pending async saves are durable; raises their error, naming the step."""
    self._rt.wait()

  def close(self) -> None:
    """Waits for pending saves and releases the Orbax manager (reopened if used again).

    A SIGTERM that arrived after the last `maybe_save` (no save was made for
    it), or while `close` waits, is honoured once the saves are durable: a
    handler installed before kckpt's is called, SIGTERM's default action
    raises ``SystemExit(143)``. (When a save fails, its error is raised
    instead.)
    """
    self._rt.close(self._index)

  # -- Restoring --------------------------------------------------------------

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

    Every process of a multi-process run must call it; a step name resolves
    to the primary process's answer on all of them.

    Args:
      state: the target: a pytree (arrays may be `jax.ShapeDtypeStruct`), a
        `CheckpointItem`, a `Composite` (only its names are read) or a
        `TopLevelCheckpointItem`. None returns the saved tree as NumPy
        arrays (the ``default`` item, or a `Composite` of all items).
      step: the step: a number, -1 or ``"latest"`` for the newest,
        ``"best"`` for the best by the configured metric, ``"last_good"``
        for the newest healthy step, or a tag given to `save`.
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
      CheckpointReadError: (an `OSError`) a file of the step is missing,
        truncated or corrupted.
    """
    self.wait_until_finished()
    return _restore.restore_run(self, state, step=step, noop_if_missing=noop_if_missing, donate=donate, partial=partial)

  # -- Telemetry --------------------------------------------------------------

  @property
  def last_save_stats(self) -> telemetry.TransferStats | None:
    """Bytes, seconds, MB/s and blocked time of the newest save of this instance (None before one).

    For an async save, `seconds` and `mb_per_s` are None until the step is
    durable; they are filled in the moment Orbax's background save finishes
    (the step committed), and are always complete once
    `wait_until_finished()`, `close()`, the next `save` or a `restore` returned.
    """
    return self._rt.save_stats

  @property
  def last_restore_stats(self) -> telemetry.TransferStats | None:
    """Bytes, seconds, MB/s of the newest `restore` of this instance (None before one)."""
    return self._rt.restore_stats

  # -- Looking at a run -------------------------------------------------------

  def summary(self, *, max_rows: int = 10) -> str:
    """A few lines on the run: its steps, and the newest ones with time and metrics; no array read."""
    if self.workdir is None:
      return f"{self!r}: no workdir bound yet"
    return _views.run_summary(self._index, max_rows=max_rows).as_text()

  def _repr_html_(self) -> str:
    """Notebook view: the steps, and the newest ones with time and metrics (no array read)."""
    if self.workdir is None:
      return f"<pre>{html.escape(repr(self))}</pre>"
    return _views.run_summary(self._index, max_rows=10).as_html()

  # -- Watching ---------------------------------------------------------------

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
    yield from watch.new_steps(
      lambda: self._index.finished(fresh=True),
      after=after,
      min_interval_secs=min_interval_secs,
      timeout=timeout,
      timeout_fn=timeout_fn,
      poll_interval_secs=poll_interval_secs,
      only_newest=only_newest,
    )
