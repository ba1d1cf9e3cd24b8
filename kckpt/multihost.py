"""Process coordination: decisions taken once and shared, waits that end, preemption.

A decision that could differ between hosts (a clock-based save, a preemption
signal, whether a background save failed) is shared by every process at the
same call, so all processes save the same steps and raise the same errors.
In a multi-process run (``jax.distributed.initialize``) this goes through the
JAX coordination service (its key-value store and barriers), and every wait
on the other processes is bounded: a process that died or is stuck makes the
others raise `ProcessTimeoutError` instead of waiting forever.

* `exchange`, `agree`, `primary_value`, `vote`: each process posts a small
  value, waits for all the others at the same call, and reads them all.
* `SaveSync`: one Orbax manager's saves seen by every process: Orbax's
  background barriers (they also stop as soon as another process failed the
  save) and the outcome of each save.
* `install_sigterm_handler`: SIGTERM is recorded (not fatal) so that the next
  `Checkpointer.maybe_save` saves and reports ``reached_preemption``.

In a single-process run these are plain function calls and nothing is sent.

>>> vote(StepVote(preempt=True), timeout_secs=1, what="maybe_save(step=3)").preempt
True
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import threading
import time
from typing import Any

import jax

from kckpt.errors import PeerSaveError, ProcessTimeoutError

log = logging.getLogger("kckpt")

DEFAULT_BARRIER_TIMEOUT_SECS = 300.0


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_primary() -> bool:
  return jax.process_index() == 0


def _client() -> Any:
  """The coordination-service client made by ``jax.distributed.initialize``."""
  # JAX 0.10 internal: public JAX has no accessor for the client (Orbax reads
  # the same attribute); kckpt uses its key-value store and barriers.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
      f"This is process {jax.process_index()} of {jax.process_count()}, but JAX's distributed"
      " service is not running: call jax.distributed.initialize() first."
    )
  return client


# ---------------------------------------------------------------------------
# Barriers and exchanges, each bounded by a timeout
# ---------------------------------------------------------------------------

_TIMED_OUT = re.compile(r"timed out task names:(.*?)(?:RPC:|$)", re.S | re.I)


def _missing_processes(error: BaseException) -> tuple[int, ...]:
  """The processes a coordination-service timeout names, if it names any."""
  match = _TIMED_OUT.search(str(error))
  if not match:
    return ()
  names = match.group(1)
  found = re.findall(r"task:(\d+)", names) or re.findall(r"^\s*(\d+)\s*$", names, re.M)
  return tuple(sorted({int(p) for p in found}))


def _timeout_error(what: str, timeout_secs: float, error: BaseException) -> ProcessTimeoutError:
  missing = _missing_processes(error)
  who = f"process(es) {list(missing)}" if missing else "some process(es)"
  return ProcessTimeoutError(
    f"{what}: {who} did not get there within {timeout_secs:g} s (Checkpointer.barrier_timeout_secs)."
    " A process died or is stuck; the run cannot go on. Exit this process (os._exit: JAX's shutdown"
    f" would wait for the missing ones) and restart the job. ({str(error).strip().splitlines()[0][:300]})",
    processes=missing,
  )


def barrier(name: str, *, timeout_secs: float, what: str) -> None:
  """Waits until every process called ``barrier(name)``; raises `ProcessTimeoutError` after `timeout_secs`."""
  if process_count() == 1:
    return
  try:
    _client().wait_at_barrier(f"kckpt/{name}", max(1, int(timeout_secs * 1000)))
  except jax.errors.JaxRuntimeError as e:
    raise _timeout_error(what, timeout_secs, e) from e


_calls: collections.Counter[str] = collections.Counter()
_posted: dict[str, int] = {}
_calls_lock = threading.Lock()


def exchange(name: str, value: Any, *, timeout_secs: float, what: str) -> dict[int, Any]:
  """Every process posts `value` (JSON, or None for nothing) and gets all of them.

  Each call of `name` is one round: every process must make the same calls
  in the same order (as it must call Orbax). Returns ``{process: value}`` for
  the processes that posted a value. Costs one barrier and one read of the
  key-value store; posting costs one write.

  Raises:
    ProcessTimeoutError: a process did not make the same call within `timeout_secs`.
  """
  if process_count() == 1:
    return {} if value is None else {0: value}
  client, me = _client(), process_index()
  with _calls_lock:
    call = _calls[name]
    _calls[name] += 1
  round_key = f"kckpt/x/{name}/{call}"
  if value is not None:
    client.key_value_set(f"{round_key}/{me}", json.dumps(value), allow_overwrite=True)
  barrier(f"x/{name}", timeout_secs=timeout_secs, what=what)
  values = {int(key.rsplit("/", 1)[1]): json.loads(v) for key, v in client.key_value_dir_get(round_key + "/")}
  with _calls_lock:
    previous = _posted.pop(name, None)
    if value is not None:
      _posted[name] = call
  if previous is not None:  # every process read that round before it reached this one
    client.key_value_delete(f"kckpt/x/{name}/{previous}/{me}")
  return values


def agree(flag: bool, *, timeout_secs: float = DEFAULT_BARRIER_TIMEOUT_SECS, what: str = "a decision") -> bool:
  """The primary process's `flag`, on every process (each must call it)."""
  return bool(exchange("agree", True if (flag and is_primary()) else None, timeout_secs=timeout_secs, what=what))


def primary_value(value: Any, *, timeout_secs: float = DEFAULT_BARRIER_TIMEOUT_SECS, what: str = "a value") -> Any:
  """The primary process's `value` (JSON), on every process (each must call it)."""
  if process_count() == 1:
    return value
  values = exchange("primary_value", [value] if is_primary() else None, timeout_secs=timeout_secs, what=what)
  return values[0][0]


@dataclasses.dataclass(frozen=True)
class StepVote:
  """What one process says at a `maybe_save` call, or what they all decided.

  Attributes:
    preempt: this process was asked to stop (SIGTERM, `request_preemption`);
      decided: any process was.
    time_due: the save interval in seconds has passed on this clock;
      decided: on the primary's clock.
    save_done: this process's background save finished (well or not);
      decided: on any process, so every process now waits for its own and
      raises the same error, if any.
    exit_after: this process will end after the preemption save (SIGTERM's
      default action); decided: any process will, so they all end at the
      same call instead of leaving the others waiting for it.
    peer_copy: how many chunks of the local tier's copy to peers in flight
      this process has received (None: none in flight); decided: the fewest
      of any process, so that they all dispatch the same next chunks.
  """

  preempt: bool = False
  time_due: bool = False
  save_done: bool = False
  exit_after: bool = False
  peer_copy: int | None = None


def vote(mine: StepVote, *, timeout_secs: float, what: str) -> StepVote:
  """Shares every process's `StepVote` at one call and returns the decision."""
  if process_count() == 1:
    return mine
  flags = ("preempt", "time_due", "save_done", "exit_after")
  posted: list[Any] = sorted(k for k in flags if getattr(mine, k) and (k != "time_due" or is_primary()))
  if mine.peer_copy is not None:
    posted.append(mine.peer_copy)
  values = exchange("vote", posted or None, timeout_secs=timeout_secs, what=what)
  copied = [x for v in values.values() for x in v if isinstance(x, int)]
  return StepVote(
    preempt=any("preempt" in v for v in values.values()),
    time_due="time_due" in values.get(0, ()),
    save_done=any("save_done" in v for v in values.values()),
    exit_after=any("exit_after" in v for v in values.values()),
    peer_copy=min(copied) if len(copied) == process_count() else None,  # every process has one in flight
  )


# ---------------------------------------------------------------------------
# Saves seen by every process
# ---------------------------------------------------------------------------


_save_syncs = itertools.count()


class SaveSync:
  """The saves of one Orbax manager, as every process sees them.

  * `barrier_sync_fn` is Orbax's ``AsyncOptions.barrier_sync_fn``: the
    barriers of a background save, on the key-value store, which stop with
    `PeerSaveError` as soon as another process failed this save instead of
    waiting for Orbax's timeout. A process failed when it reported it, or
    when it waits at a barrier that comes *after* this one in the order that
    the last successful save followed (it skipped this one). Until a save
    succeeded that order is unknown, and a failure on another process
    surfaces after ``async_timeout_secs``.
  * `share_outcome` exchanges each save's outcome after every process waited
    for its own part, so a failure on one process is raised on all.

  Every process makes one per manager, in the same order.
  """

  def __init__(self, directory: str, *, timeout_secs: float):
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:10]
    self._name = f"s/{digest}/{next(_save_syncs)}"
    self._directory = directory
    self._timeout_secs = timeout_secs
    self._client = _client()
    self._n, self._me = process_count(), process_index()
    self._lock = threading.Lock()
    self._save = 0  # the number of the current save (1, 2, ...)
    self._step: int | None = None
    self._occurrences: collections.Counter[str] = collections.Counter()
    self._sequence: list[str] = []  # the barriers of the current save, in order
    self._order: dict[str, int] = {}  # ... of the last save that succeeded
    # Orbax's barriers when it opens the manager have no timeout: meet here first.
    barrier(f"{self._name}/open", timeout_secs=timeout_secs, what=f"opening {directory} for saving")

  def _round(self, save: int) -> str:
    return f"kckpt/{self._name}/{save}"

  def begin_save(self, step: int) -> None:
    """Called by every process before it starts saving `step` (its previous save waited for)."""
    with self._lock:
      self._save += 1
      self._step = step
      self._occurrences.clear()
      self._sequence = []
      old = self._save - 2  # every process finished that one before the previous one ended
    if old >= 1 and self._me == 0:
      self._client.key_value_delete(self._round(old))

  def post_stats(self, partials: Any) -> None:
    """This process's per-leaf statistics of the current save, for the primary (`gathered_stats`)."""
    if self._save:
      self._client.key_value_set(f"{self._round(self._save)}/stats/{self._me}", json.dumps(partials), allow_overwrite=True)

  def gathered_stats(self) -> list[Any]:
    """The statistics the other processes posted for the current save.

    Called by the primary just before the commit: Orbax's barrier before it
    means every process finished writing (and posting).
    """
    if not self._save:
      return []
    entries = self._client.key_value_dir_get(f"{self._round(self._save)}/stats/")
    return [json.loads(value) for key, value in entries if int(key.rsplit("/", 1)[1]) != self._me]

  @property
  def process_index(self) -> int:
    return self._me

  def report_failure(self, message: str) -> None:
    """Tells the other processes that this process failed the current save."""
    if self._save:
      self._client.key_value_set(f"{self._round(self._save)}/failed/{self._me}", message[:2000], allow_overwrite=True)

  def barrier_sync_fn(self, *, key: str, timeout_ms: int) -> None:
    """Orbax's `BarrierSyncFn`: waits for every process at `key` of the current save."""
    with self._lock:
      save, step = self._save, self._step
      kind = re.sub(r"\d+", "N", key).replace("/", "|")  # the same name in every save ("…ckpt_N")
      name = f"{kind}#{self._occurrences[kind]}"
      self._occurrences[kind] += 1
      self._sequence.append(name)
      order = self._order
    prefix = self._round(save)
    done_key = f"{prefix}/d/{name}"
    self._client.key_value_set(f"{prefix}/b/{name}/{self._me}", "1", allow_overwrite=True)
    deadline = time.monotonic() + timeout_ms / 1000
    pause = 0.02
    while True:
      arrived, later, failed, done = set(), set(), {}, False
      for full_key, value in self._client.key_value_dir_get(prefix + "/"):
        parts = full_key[len(prefix) + 1 :].split("/")
        if parts[0] == "b" and len(parts) == 3:
          if parts[1] == name:
            arrived.add(int(parts[2]))
          elif name in order and order.get(parts[1], -1) > order[name]:
            later.add(int(parts[2]))
        elif parts[0] == "d" and len(parts) == 2 and parts[1] == name:
          done = True
        elif parts[0] == "failed" and len(parts) == 2 and int(parts[1]) != self._me:
          failed[int(parts[1])] = value
      if done or len(arrived) == self._n:
        if not done:  # the last one here wakes the others
          self._client.key_value_set(done_key, "1", allow_overwrite=True)
        return
      if failed:
        raise PeerSaveError(
          f"stopped saving step {step}: " + "; ".join(f"process {p} failed: {m}" for p, m in sorted(failed.items()))
        )
      # A process waiting at a later barrier that never came here skipped this
      # one: its part of the save failed (it raises its own error).
      skipped = sorted(later - arrived)
      if skipped:
        raise PeerSaveError(f"stopped saving step {step}: process(es) {skipped} failed it (see their error)")
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = sorted(set(range(self._n)) - arrived)
        raise TimeoutError(
          f"Saving step {step}: process(es) {missing} did not reach Orbax barrier {key!r} within"
          f" {timeout_ms / 1000:g} s (Checkpointer.async_timeout_secs)"
        )
      try:  # sleeps until the last process arrives, or `pause` to look for failures again
        self._client.blocking_key_value_get(done_key, max(1, int(min(pause, remaining) * 1000)))
        return
      except jax.errors.JaxRuntimeError:
        pause = min(pause * 2, 1.0)

  def share_outcome(self, step: int | None, error: BaseException | None) -> dict[int, str]:
    """Every process's failure of `step` (``{process: message}``; empty when all went well)."""
    mine = None if error is None else f"{type(error).__name__}: {error}"[:2000]
    if mine is not None:
      self.report_failure(mine)  # in case a process still waits in a barrier of this save
    what = "waiting for the save" + (f" of step {step}" if step is not None else "s") + f" in {self._directory}"
    values = exchange(f"{self._name}/outcome", mine, timeout_secs=self._timeout_secs, what=what)
    if step is not None and not values:
      with self._lock:  # a save that went well on every process: its barriers' order
        self._order = {name: i for i, name in enumerate(self._sequence)}
    return dict(sorted(values.items()))

  @staticmethod
  def describe(failures: dict[int, str]) -> str:
    return describe_failures(failures)


def describe_failures(failures: dict[int, str]) -> str:
  """``"on process 1: OSError: ... (process 0 stopped saving it)"`` for `SaveSync.share_outcome`'s result."""
  stopped = sorted(p for p, m in failures.items() if m.startswith(PeerSaveError.__name__))
  causes = {p: m for p, m in failures.items() if p not in stopped} or failures
  text = "; ".join(f"on process {p}: {m}" for p, m in sorted(causes.items()))
  others = [p for p in stopped if p not in causes]
  if others:
    text += f" (process{'es' * (len(others) > 1)} {', '.join(map(str, others))} stopped saving it)"
  return text
