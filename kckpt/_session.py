"""The open writer of one run: its lock, the Orbax writer, the save in flight, retention.

A `WriteSession` is what a `Checkpointer` opens at its first write and
releases at `close`; it is never part of the `Checkpointer`'s configuration
(copies and pickles of a `Checkpointer` carry none of it).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
from etils import epath

from kckpt import _gc
from kckpt import _health
from kckpt import _layout
from kckpt import _local_tier
from kckpt import _orbax
from kckpt import _preemption
from kckpt import _progress
from kckpt import _provenance
from kckpt import _run
from kckpt import items as items_lib
from kckpt import lock as lock_lib
from kckpt import markers
from kckpt import multihost
from kckpt import policies
from kckpt import telemetry
from kckpt import trees
from kckpt._types import Step
from kckpt.errors import CheckpointNotFoundError, StepAlreadyExistsError

if TYPE_CHECKING:
  from kckpt.checkpointer import Checkpointer

log = logging.getLogger("kckpt")

# Sessions with a writer open, and local tiers, finished before the interpreter exits (see _finish_at_exit).
_open_sessions: weakref.WeakSet[WriteSession] = weakref.WeakSet()
_open_tiers: weakref.WeakSet[_local_tier.LocalTier] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_installed = False


def _finish_at_exit() -> None:
  """Waits for the async saves in flight of every open session and local tier, before Python joins threads at exit.

  A script that ends right after an async `save` without `close()` would
  otherwise lose the step and hang: Orbax's background save then finds the
  thread pools shut down ("cannot schedule new futures after interpreter
  shutdown") and its signalling threads wait forever. Errors are logged
  (there is no caller left to raise them to).
  """
  # Only those with a save in flight, in one order on every process (a
  # multi-process close exchanges with the others): the local tiers first, as `wait_until_finished`.
  for tier in sorted((t for t in _open_tiers if t.in_flight_step is not None), key=lambda t: t.run):
    try:
      tier.close()
    except Exception:  # pylint: disable=broad-exception-caught  # at exit: report, never mask the exit
      log.exception("kckpt: finishing the local-tier save in flight of %s at exit failed", tier.folder)
  for session in sorted((s for s in _open_sessions if s.in_flight_step is not None), key=lambda s: str(s.directory)):
    try:
      session.close()
    except Exception:  # pylint: disable=broad-exception-caught  # at exit: report, never mask the exit
      log.exception("kckpt: finishing the save in flight of %s at exit failed", session.directory)


def _install_exit_hook() -> None:
  global _exit_hook_installed
  with _exit_hook_lock:
    if not _exit_hook_installed:
      # Python 3.9+ internal, used by concurrent.futures itself: called before non-daemon threads
      # are joined, and in reverse order of registration. concurrent.futures registers its own
      # (which shuts the thread pools down) when its thread module is first imported: import it
      # now, so that ours comes after it and runs first, while the pools still take work.
      import concurrent.futures.thread  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

      try:
        threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]  # pylint: disable=protected-access
      except RuntimeError:  # opened while Python is already shutting down: too late for the hook
        return
      _exit_hook_installed = True


class WriteSession:
  """Owns the writer lock and the Orbax writer of one `Checkpointer`'s run.

  Opening one takes the writer lock (on the primary process) before Orbax's
  manager exists: opening the manager cleans up temporary folders, which could
  be another live writer's step in progress.
  """

  def __init__(self, config: Checkpointer, index: _run.RunIndex, runtime: Runtime):
    self._config = config
    self._index = index
    self._runtime = runtime
    self.directory = index.checkpoints
    assert config.workdir is not None  # `Checkpointer.directory` raised otherwise
    self._workdir = config.workdir
    workdir = epath.Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f"Checkpointer.workdir {config.workdir} exists and is not a folder")
    self._lock: lock_lib.WriterLock | None = None
    if multihost.is_primary():
      self._lock = lock_lib.WriterLock(self.directory, stale_secs=config.lock_stale_secs)
      self._lock.acquire()
    try:
      if self._lock is not None:
        markers.clear_end_marker(self._workdir)  # saving again: the run is not finished
        _layout.write_retention_rules(self.directory, policies.retention_rules(config.retention_policy))
      self._writer = _orbax.Writer(
        self.directory,
        async_save=config.async_save,
        multiprocessing_options=config.multiprocessing_options,
        decide_preservation=self._decide_preservation,
        keep_at_deletion=self._is_last_good,
        async_timeout_secs=config.async_timeout_secs,
        durable=config.durable,
        sync=multihost.SaveSync(str(self.directory), timeout_secs=config.barrier_timeout_secs)
        if multihost.process_count() > 1
        else None,
        storage=config.storage,
      )
    except BaseException:
      if self._lock is not None:
        self._lock.release()
      raise
    # The statistics of saves not yet committed, by step (the one in flight; a failed one until dropped).
    self._collectors: dict[Step, Any] = {}
    self._collectors_lock = threading.Lock()
    _install_exit_hook()
    _open_sessions.add(self)

  # -- The save in flight -------------------------------------------------------

  @property
  def in_flight_step(self) -> Step | None:
    """The step whose async save was started and not yet waited for."""
    return self._writer.in_flight_step

  def background_save_done(self) -> bool:
    """Whether a save is in flight and its background part has finished (well or not)."""
    return self._writer.in_flight_step is not None and not self._writer.is_busy()

  def step_exists(self, step: Step) -> bool:
    return self._writer.in_flight_step == step or step in self._index.finished()

  def wait(self) -> None:
    """Blocks until the save in flight is durable; raises its error, naming the step."""
    try:
      self._writer.wait()
    except BaseException:
      self._drop_collectors()  # the failed save's statistics (and its commit work) are never used
      raise
    finally:
      self._index.invalidate()

  def _drop_collectors(self) -> None:
    """Closes the statistics (and unregisters the commit work) of every save not committed."""
    with self._collectors_lock:
      dropped, self._collectors = list(self._collectors.values()), {}
    for collector in dropped:
      _orbax.close_collector(collector)
      _orbax.before_commit(_layout.step_dir(self.directory, collector.step), None)

  def _done_with(self, collector: Any) -> None:
    """The statistics of a committed save (or posted to the primary) are not needed any more."""
    with self._collectors_lock:
      self._collectors.pop(collector.step, None)
    _orbax.close_collector(collector)

  # -- Saving -------------------------------------------------------------------

  @_gc.paused()  # a fresh pause per call (contextlib's decorator form)
  def save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool,
    metrics: Mapping[str, Any] | None,
    tag: str | None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    """Starts saving `state` as `step` (see `Checkpointer.save`); False when `force` and it exists.

    Python's cyclic GC is paused until it returns (see `kckpt._gc`): an async save's snapshot, a sync
    save until durable, and the wait for a previous save still committing.
    """
    started = time.perf_counter()
    self._writer.poll()
    if self._lock is not None:
      self._lock.check()
    layout = items_lib.layout_of(state)
    writes = item_writes(layout)
    _run.check_tag(tag)
    if self.step_exists(step):
      if force:
        log.info("Step %d already exists in %s: not saved again.", step, self.directory)
        return False
      raise StepAlreadyExistsError(
        f"Step {step} already exists in {self.directory}; kckpt never overwrites a step."
        f" Delete it first (ckpt.delete({step})) or pass force=True to skip it."
      )
    provenance = _provenance.step_provenance((w.value for w in writes if w.format == "pytree"), config)
    metrics_healthy = self._metrics_health(step, metrics)
    now = round(time.time(), 6)  # the step's time, recorded in it; microseconds, as a datetime holds it
    self._index.remember(policies.StepRecord(step=step, time=now, metrics=metrics))
    nbytes = sum(trees.tree_nbytes(w.value) for w in writes if w.format == "pytree")
    stats = telemetry.SaveTelemetry(
      self._publish_stats,
      self.directory,
      step=step,
      nbytes=nbytes,
      started=started,
      async_save=self._config.async_save,
    )
    if self._writer.in_flight_step is None:
      self._drop_collectors()  # those of a save that failed before its commit
    collector = _health.start(
      self.directory, step, writes, primary=self._finishes_steps(), on_complete=self._post_stats, checksums=self._writer.checksums
    )
    with self._collectors_lock:
      self._collectors[step] = collector
    progress = None
    if not self._config.async_save:  # an async save's caller does not wait: it shows nothing
      progress = _progress.Transfer(
        f"save step {step}",
        total_bytes=nbytes,
        total_leaves=collector.expected_arrays,
      )
      collector.on_written = progress.advance
    try:
      self._writer.save(
        step,
        writes,
        metrics,
        custom_metadata=_orbax.custom_metadata(
          time=now,
          tag=tag,
          metrics=metrics,
          escaped_items=[w.name for w in writes if w.escaped],
          checksums=_orbax.CRC32C_SHARDS if self._writer.checksums else None,
          provenance=provenance,
        ),
        on_durable=stats.durable,
        before_commit=lambda tmp: self._before_commit(tmp, step, collector, metrics_healthy),
      )
    except BaseException:
      self._index.forget(step)
      self._drop_collectors()  # this save's, and a previous one's whose failure the writer raised
      if progress is not None:
        progress.close()
      raise
    finally:
      self._index.invalidate()
    self._runtime.last_save_time = now
    if not self._config.async_save:
      try:
        self._writer.wait()
      finally:
        if progress is not None:
          progress.close()
    stats.returned(time.perf_counter())
    return True

  def _metrics_health(self, step: Step, metrics: Mapping[str, Any] | None) -> bool | None:
    """The `health_fn`'s verdict on the metrics (None without one); its errors name the step."""
    health_fn = self._config.health_fn
    if health_fn is None:
      return None
    try:
      return bool(health_fn(metrics))
    except Exception as e:
      raise ValueError(f"save(step={step}): health_fn raised {type(e).__name__}: {e} (nothing was saved)") from e

  def _finishes_steps(self) -> bool:
    """Whether this process commits the steps (Orbax's primary host; every process when it is None)."""
    options = self._config.multiprocessing_options
    primary = 0 if options is None else options.primary_host
    return primary is None or jax.process_index() == primary

  def _post_stats(self, collector: Any) -> None:
    """A non-primary process's statistics of the shards it wrote, for the primary (multi-process runs)."""
    if not self._finishes_steps():  # the primary reads them before the commit; this process is done with them
      self._writer.post_stats(_health.shared(collector))
      self._done_with(collector)

  def _before_commit(self, tmp: epath.Path, step: Step, collector: Any, metrics_healthy: bool | None) -> None:
    """On the primary, just before the commit: the step's health and leaf statistics, written into it."""
    try:
      options = self._config.multiprocessing_options
      shared = options is None or options.primary_host is not None  # else every process commits its own steps
      record = _health.finish(
        tmp, collector, self._writer.gathered_stats() if shared else [], metrics_healthy, checksums=self._writer.checksums
      )
    finally:
      self._done_with(collector)
    self._index.remember_health(step, record["healthy"])

  def _publish_stats(self, stats: telemetry.TransferStats) -> None:
    self._runtime.save_stats = stats

  def _decide_preservation(self, known_steps: Sequence[Step]) -> list[bool]:
    """Orbax's question "which of these steps stay?", answered by kckpt's retention rules."""
    records = [self._index.record(s) for s in known_steps]
    decisions = {
      d.step: d.keep for d in policies.decide_retention(self._config.retention_policy, records, is_healthy=self._index.healthy)
    }
    for step, keep in decisions.items():
      if not keep:
        self._index.forget(step)
    return [decisions[s] for s in known_steps]

  def _is_last_good(self, step: Step) -> bool:
    """Asked as Orbax deletes `step` after a commit: whether it is the newest healthy step (then it stays)."""
    if not self._index.healthy(step):
      return False
    newer = [s for s in self._index.finished(fresh=True) if s > step]
    return bool(newer) and not any(self._index.healthy(s) for s in newer)

  # -- Deleting -----------------------------------------------------------------

  def delete(self, step: Step) -> None:
    """`Checkpointer.delete`: once pending saves are durable, removes the finished `step` (else raises)."""
    self.wait()
    finished = self._index.finished(fresh=True)
    if step not in finished:
      raise CheckpointNotFoundError(
        f"Cannot delete step {step}: not in {self._index.checkpoints} (steps: {_layout.steps_repr(finished)})",
        available_steps=finished,
      )
    self._writer.delete(step)
    self._index.forget(step)
    self._index.invalidate()

  def delete_all(self) -> list[Step]:
    """Deletes every step folder and the leftovers of crashed saves; returns the deleted steps."""
    self._writer.wait()
    listing = self._index.listing(fresh=True)
    for step in listing.finished:
      self._writer.delete(step)
      self._index.forget(step)
    if multihost.is_primary():
      for name in listing.unfinished:
        (self.directory / name).rmtree(missing_ok=True)
    markers.clear_end_marker(self._workdir)
    self._index.invalidate()
    return list(listing.finished)

  def close(self) -> None:
    """Waits for the save in flight, closes the Orbax manager and releases the writer lock."""
    _open_sessions.discard(self)
    try:
      self._writer.close()
    finally:
      self._drop_collectors()
      if self._lock is not None:
        self._lock.release()
      self._index.invalidate()


def item_writes(layout: items_lib.Layout) -> list[_orbax.ItemWrite]:
  """What to hand the writer for each item of `layout`; ValueError naming an item or leaf that cannot be saved."""
  writes = []
  for name, item in layout.items.items():
    if item is None:
      raise ValueError(f"item {name!r} is None: nothing to save")
    value = item.checkpoint_value()
    if item.format == "json":
      items_lib.check_json(value, name=name)
    else:
      bad, collisions = trees.save_check(value)
      if bad:
        where = "" if layout.kind == "single" else f"item {name!r}: "
        raise ValueError(
          f"{where}cannot save these leaves (a pytree of arrays, NumPy values and Python scalars is expected):\n  "
          + "\n  ".join(bad)
        )
      if not jax.tree.leaves(value) and layout.kind == "single":
        raise ValueError(f"cannot save {type(value).__name__}: it has no array or scalar leaves")
      if collisions:  # {"a.b": x, "a": {"b": y}}: Orbax would write both as a.b
        escaped = trees.escape_dotted_keys(value)
        left = trees.path_collisions(escaped)
        if left:  # keys of a mapping kckpt cannot rebuild, or of a custom pytree node
          where = "" if layout.kind == "single" else f"item {name!r}: "
          raise ValueError(
            f"{where}leaves would be saved under the same name {left[:5]} (a key with a dot next to nested"
            " keys, in a container kckpt cannot rename); use plain dicts or keys without dots there"
          )
        writes.append(_orbax.ItemWrite(name=name, format=item.format, value=escaped, escaped=True))
        continue
    writes.append(_orbax.ItemWrite(name=name, format=item.format, value=value))
  return writes


class Runtime:
  """The mutable side of one `Checkpointer`: its session and what outlives one (never configuration)."""

  def __init__(self) -> None:
    self.lock = threading.RLock()
    self.session: WriteSession | None = None
    self.preemption = _preemption.Preemption()
    self.last_save_time = time.time()  # for `save_interval_secs`
    self.save_stats: telemetry.TransferStats | None = None
    self.restore_stats: telemetry.TransferStats | None = None
    self.local_tier: _local_tier.LocalTier | None = None  # made by the first local-tier call

  def local(self, make: Callable[[], _local_tier.LocalTier]) -> _local_tier.LocalTier:
    """The local tier (made by `make` at the first call, and again after `close`)."""
    with self.lock:
      if self.local_tier is None:
        self.local_tier = make()
        _open_tiers.add(self.local_tier)
        _install_exit_hook()
      return self.local_tier

  def wait(self) -> None:
    """`Checkpointer.wait_until_finished`: both tiers' pending saves."""
    session, tier = self.session, self.local_tier
    if tier is not None:
      tier.wait()
    if session is not None:
      session.wait()

  def wait_persistent(self) -> None:
    """The persistent tier's pending save only (a local save's copy to peers goes on at the next calls)."""
    if (session := self.session) is not None:
      session.wait()

  def time_due(self, policy: policies.SavePolicy, step: Step) -> bool:
    """Whether `save_interval_secs` says `step` is due, on this process's clock."""
    return policies.time_due(policy, step, since_last_save=time.time() - self.last_save_time)

  def should_save(self, policy: policies.SavePolicy, step: Step, *, time_due: bool, index: _run.RunIndex) -> bool:
    """Whether `maybe_save` saves `step`: a rule (or the clock) says so and the step does not exist yet."""
    if policies.save_reason(policy, step) is None and not time_due:
      return False
    session = self.session
    return not (session.step_exists(step) if session is not None else step in index.finished())

  def close(self, index: _run.RunIndex) -> None:
    """`Checkpointer.close`: finishes the session, then releases the SIGTERM handler and honours a SIGTERM it held."""
    with self.lock:
      session, self.session = self.session, None
      tier, self.local_tier = self.local_tier, None
    try:
      try:
        if tier is not None:
          tier.close()
      finally:
        if session is not None:
          session.close()
    finally:
      # Only now: a SIGTERM during the wait above still finds kckpt's handler, not one that kills mid-save.
      self.preemption.release()
      index.invalidate()
    self.preemption.honour_undelivered()

  def vote(self, step: Step, *, time_due: bool, timeout_secs: float) -> multihost.StepVote:
    """What every process agrees on at `maybe_save(step)`: preemption, the primary's clock, a finished save, the peer copy.

    Then dispatches the chunks of the local tier's copy to peers in flight that the decision allows.
    """
    decision = multihost.vote(
      multihost.StepVote(
        preempt=self.preemption.pending,
        time_due=time_due,
        save_done=self.session is not None and self.session.background_save_done(),
        exit_after=self.preemption.will_exit,
        peer_copy=self.local_tier.copy_progress() if self.local_tier is not None else None,
      ),
      timeout_secs=timeout_secs,
      what=f"maybe_save(step={step})",
    )
    if self.local_tier is not None:
      self.local_tier.advance(decision.peer_copy)
    return decision
