"""The fast local tier: steps on each process's own disk, with a copy of its shards on a peer.

A `Checkpointer` with a `local_workdir` also saves, every
`local_save_interval_steps` steps of `maybe_save`, each process's own shards
into its own folder (node-local SSD, a RAM disk) and, with `local_replicas`,
into the folders of peers (on other hosts when there are several: see
`kckpt._peers`), so that one lost host loses no step. Readers of `workdir`
never see these steps.

On disk, one folder per step, written as ``.tmp-ckpt_<step>-<id>`` and
renamed to ``ckpt_<step>`` once complete (a crash leaves only the temporary
folder, which no listing counts and the next save removes). It holds
``STEP.json`` (the step, the run's persistent folder, the process count and
index, which processes' shards it holds, whether the step is healthy, when
it was saved) and each of those processes' packed shards
(`kckpt._local_format`). ``HIDDEN.json`` in the folder lists local steps of
an abandoned continuation: newer than the step a writer last restored into a
target. They are never restored, and the next local save removes them.

Every method that moves data or decides (`save`, `advance`, `wait`,
`restore_newest`) is a collective: every process calls it, and an error on
one process is raised on all of them, so that none waits for the others'
next exchange. The exception is a copy to peers that stops part-way (a
process died, is stuck, or could not dispatch a chunk): the processes may
then have different collectives in flight, so each raises on its own
(`ProcessTimeoutError` once no chunk moved for `timeout_secs`) with an
error that says the run cannot go on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kckpt import _local_format as fmt
from kckpt import _peers
from kckpt import multihost
from kckpt._types import PyTree, Step
from kckpt.errors import BackgroundSaveError, ProcessTimeoutError

log = logging.getLogger("kckpt")

STEP_FILE = "STEP.json"
HIDDEN_FILE = "HIDDEN.json"
# In the persistent tier's folder: a random id of this incarnation of the run, made at its first local save.
# A workdir deleted and started again gets a new one, so the old local steps are never restored.
RUN_ID_FILE = "LOCAL_TIER_RUN_ID.json"
_STEP_NAME = re.compile(r"ckpt_(\d+)$")
_TMP_PREFIX = ".tmp-ckpt_"
# At most this many local steps are tried, newest first, before the persistent tier.
_MAX_TRIES = 3


@dataclasses.dataclass(frozen=True)
class LocalStep:
  """What one process's folder says of a local step."""

  step: Step
  owners: tuple[int, ...]
  healthy: bool
  ours: bool  # saved by this run with this layout (the same process count and index)
  unusable: str | None  # why this run cannot restore it, or None


@dataclasses.dataclass(frozen=True)
class _Pending:
  """The local save in flight: its step, its background work (collecting the peers' copies, writing), the copy."""

  step: Step
  future: concurrent.futures.Future[None]
  copy: _peers.PeerCopy | None


class LocalTier:
  """The local tier of one `Checkpointer` in this process: its folder, a background writer, retention."""

  def __init__(
    self,
    folder: Path,
    *,
    run: str,
    run_id_file: Any = None,
    interval: int,
    max_to_keep: int,
    replicas: int,
    durable: bool,
    timeout_secs: float,
  ):
    self.folder = folder
    self.run = run
    self.run_id_file = run_id_file  # an epath.Path in the persistent tier (None: no incarnation check)
    self._run_id: str | None = None
    self.interval = interval
    self.max_to_keep = max_to_keep
    self.replicas = replicas
    self.durable = durable
    self.timeout_secs = timeout_secs
    self._shifts: list[int] | None = None  # where the copies go (decided at the first save, by every process)
    self._pending: _Pending | None = None
    self._last_saved: Step | None = None
    self._spare: np.ndarray | None = None  # the last save's own buffer, reused once it is written

  def _exchange(self, name: str, value: Any) -> dict[int, Any]:
    return multihost.exchange(name, value, timeout_secs=self.timeout_secs, what="a local-tier save or restore")

  def _agree(self, error: str | None) -> list[str]:
    """Every process's error (this one's included), sorted by process; [] when none failed."""
    if multihost.process_count() == 1:
      return [] if error is None else [error]
    errors = self._exchange("local_tier_error", error)
    return [errors[p] for p in sorted(errors)]

  # -- Listing ----------------------------------------------------------------

  def listing(self) -> list[LocalStep]:
    """This process's local steps (finished folders only), oldest first."""
    try:
      names = os.listdir(self.folder)
    except OSError:
      return []
    hidden = set(self._hidden())
    found = []
    for name in names:
      match = _STEP_NAME.match(name)
      record = _read_json(self.folder / name / STEP_FILE) if match else {}
      if not match or not record:
        continue  # not a step, or not a finished one
      step = int(match.group(1))
      why = self._unusable(record)
      ours = why is None
      why = why or self._same_run_unusable(record)
      if why is None and step in hidden:
        why = "it belongs to a continuation this run abandoned (an older step was restored since)"
      found.append(LocalStep(step, tuple(record.get("owners", ())), bool(record.get("healthy", True)), ours, why))
    return sorted(found, key=lambda s: s.step)

  def _hidden(self) -> list[Step]:
    record = _read_json(self.folder / HIDDEN_FILE)
    return [int(s) for s in record.get("steps", ())] if record.get("run") == self.run else []

  def _set_hidden(self, steps: list[Step]) -> None:
    path = self.folder / HIDDEN_FILE
    if not steps:
      path.unlink(missing_ok=True)
      return
    tmp = self.folder / f".{HIDDEN_FILE}.{uuid.uuid4().hex[:8]}"
    self._write_file(tmp, json.dumps({"run": self.run, "steps": sorted(steps)}).encode())
    os.replace(tmp, path)
    if self.durable:
      _fsync_dir(self.folder)

  def _read_run_id(self) -> str | None:
    if self._run_id is None and self.run_id_file is not None:
      try:
        self._run_id = str(json.loads(self.run_id_file.read_text())["id"])
      except (OSError, ValueError, KeyError, TypeError):
        return None
    return self._run_id

  def _ensure_run_id(self) -> None:
    """Every process: the run's incarnation id, made by the primary at the first local save."""
    if self._run_id is not None or self.run_id_file is None:
      return
    mine = None
    if multihost.is_primary():
      mine = self._read_run_id()
      if mine is None:
        try:
          self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
          self.run_id_file.write_text(json.dumps({"id": uuid.uuid4().hex}))
          mine = self._read_run_id()
        except OSError as e:  # the steps are then saved without one (and restored as such)
          log.warning("kckpt: could not write the local tier's run id %s: %s", self.run_id_file, e)
    self._run_id = multihost.primary_value(mine, timeout_secs=self.timeout_secs, what="the local tier's run id")

  def _same_run_unusable(self, record: Mapping[str, Any]) -> str | None:
    """Why a step of this run's folder and layout cannot be restored: saved by an earlier incarnation of the run."""
    if self.run_id_file is None:
      return None
    current = self._read_run_id()
    if record.get("run_id") != current:
      return "it was saved before the run's workdir was started again (its run id differs)"
    return None

  def _unusable(self, record: Mapping[str, Any]) -> str | None:
    n, me = multihost.process_count(), multihost.process_index()
    if record.get("format") != fmt.FORMAT:
      return f"it has another format ({record.get('format')!r})"
    if record.get("run") != self.run:
      return f"it belongs to another run (of {record.get('run')})"
    if record.get("process_count") != n:
      return f"it was saved by {record.get('process_count')} processes, this run has {n}"
    if record.get("process_index") != me:
      return f"it was saved by process {record.get('process_index')}, this is process {me}"
    return None

  def steps(self) -> list[Step]:
    """Steps this process holds its own shards of, that this run can restore."""
    me = multihost.process_index()
    return [s.step for s in self.listing() if s.unusable is None and me in s.owners]

  # -- Saving -----------------------------------------------------------------

  def due(self, step: Step) -> bool:
    return step % self.interval == 0 and step != self._last_saved

  def save(
    self,
    tree: PyTree,
    step: Step,
    *,
    async_save: bool,
    metrics: Mapping[str, Any] | None = None,
    health_fn: Callable[[Any], bool] | None = None,
  ) -> None:
    """Starts saving this process's shards of `tree` (and its peers' copies) as local `step`; every process calls it.

    The shards are on the host when it returns; the copy to peers moves at
    the next `advance` calls and ends at `wait` (at once with
    ``async_save=False``). The step is unhealthy when a floating leaf holds NaN or infinity, or
    `health_fn(metrics)` says so (as for the persistent tier).
    """
    self.wait()
    me, n = multihost.process_index(), multihost.process_count()
    self._ensure_run_id()
    if self._shifts is None:
      self._shifts = _peers.shifts(self.replicas, timeout_secs=self.timeout_secs)
    spare, self._spare = self._spare, None
    buffer, error, healthy = None, None, True
    try:
      buffer = fmt.pack(tree, step=step, owner=me, reuse=spare)
      healthy = fmt.healthy(fmt.unpack(buffer)) and (health_fn is None or bool(health_fn(metrics)))
    except Exception as e:  # pylint: disable=broad-exception-caught  # shared with every process below
      error = f"process {me}: {type(e).__name__}: {e}"
    size = 0 if buffer is None else int(buffer.size)
    if n > 1:  # one exchange: every process's error, whether its shards are healthy, its buffer's size
      got = self._exchange("local_tier_pack", {"error": error, "healthy": healthy, "size": size})
      errors = [got[p]["error"] for p in sorted(got) if got[p]["error"]]
      healthy = all(v["healthy"] for v in got.values())
      sizes = {p: int(v["size"]) for p, v in got.items()}
    else:
      errors, sizes = ([error] if error else []), {me: size}
    if errors:
      raise ValueError(f"The local-tier save of step {step} failed: {'; '.join(errors)}")
    assert buffer is not None
    self._last_saved = step
    copy = _peers.PeerCopy(buffer, self._shifts, sizes, timeout_secs=self.timeout_secs) if self._shifts else None
    if copy is not None:
      copy.advance(_peers.IN_FLIGHT)  # dispatched only: the rest at the next `maybe_save` calls (`advance`)
    self._pending = _Pending(step, _in_background(self._collect_and_write, step, buffer, copy, healthy), copy)
    if not async_save:
      self.wait()

  @property
  def in_flight_step(self) -> Step | None:
    """The step of the local save in flight (its peer copy or its writes not yet waited for), or None."""
    return None if self._pending is None else self._pending.step

  def advance(self, collected: int | None) -> None:
    """At each `maybe_save`, on every process: dispatches more chunks of the copy to peers in flight, if any.

    `collected` is the fewest chunks of it any process has copied to host
    memory (agreed at the call), so that every process dispatches the same
    chunks and none holds more than `IN_FLIGHT` on its devices. Never waits.
    """
    pending = self._pending
    if pending is not None and pending.copy is not None and collected is not None:
      pending.copy.advance(collected + _peers.IN_FLIGHT)

  def copy_progress(self) -> int | None:
    """Chunks of the copy to peers in flight that this process has copied to host memory; None without one."""
    pending = self._pending
    return None if pending is None or pending.copy is None else pending.copy.collected

  def _collect_and_write(self, step: Step, own: np.ndarray, copy: _peers.PeerCopy | None, healthy: bool) -> None:
    """The background part of a local save: this process's buffer is written while the peers' copies arrive."""
    me = multihost.process_index()
    received: dict[int, np.ndarray] = {}
    collecting = False
    try:
      tmp = self._begin(step)
      if copy is None:
        self._write_owner(tmp, me, own)
      else:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kckpt-local-tier-own") as pool:
          own_written = pool.submit(self._write_owner, tmp, me, own)
          try:
            collecting = True
            received = copy.collect()
          finally:
            concurrent.futures.wait([own_written])
          own_written.result()
    except BaseException:
      if copy is not None and not collecting:
        copy.abandon()  # else `wait` would wait for chunks this process never collects
      raise
    for owner, buffer in received.items():
      self._write_owner(tmp, owner, buffer)
    with copy.committing() if copy is not None else contextlib.nullcontext():  # never once the caller gave up
      self._commit(tmp, step, owners=sorted({me, *received}), healthy=healthy)
    self._spare = own.base if isinstance(own.base, np.ndarray) else own

  def _begin(self, step: Step) -> Path:
    """A fresh temporary folder for `step` (leftovers of a crash removed: this process is its folder's only writer)."""
    self.folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self.folder):
      if name.startswith(_TMP_PREFIX):
        shutil.rmtree(self.folder / name, ignore_errors=True)
    tmp = self.folder / f"{_TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp

  def _write_owner(self, tmp: Path, owner: int, buffer: np.ndarray) -> None:
    parts = fmt.write_parts(tmp, owner, buffer, durable=self.durable)
    self._write_file(tmp / f"p{owner}.crc.json", json.dumps({"parts": parts, **fmt.checksums(buffer)}).encode())

  def _commit(self, tmp: Path, step: Step, *, owners: list[int], healthy: bool) -> None:
    """Writes STEP.json into `tmp` and renames it to the step's folder; then retention."""
    me, n = multihost.process_index(), multihost.process_count()
    record = {
      "format": fmt.FORMAT,
      "step": step,
      "run": self.run,
      "run_id": self._run_id,
      "process_count": n,
      "process_index": me,
      "owners": owners,
      "healthy": healthy,  # every process's shards finite, and health_fn said so
      "time": time.time(),
    }
    self._write_file(tmp / STEP_FILE, json.dumps(record).encode())
    if self.durable:
      _fsync_dir(tmp)
    # This run's steps from here on belong to a continuation it abandoned (steps only grow): replaced.
    # A folder in the way (of another layout, or without its STEP.json) is moved aside, never renamed onto.
    doomed = {s.step for s in self.listing() if s.ours and s.step >= step} | {step}
    for old in sorted(doomed):
      if (self.folder / f"ckpt_{old}").exists():
        os.replace(self.folder / f"ckpt_{old}", self.folder / f"{_TMP_PREFIX}{old}-replaced-{uuid.uuid4().hex[:8]}")
    os.replace(tmp, self.folder / f"ckpt_{step}")
    if self.durable:
      _fsync_dir(self.folder)
    hidden = self._hidden()
    if any(h >= step for h in hidden):
      self._set_hidden([h for h in hidden if h < step])
    for name in os.listdir(self.folder):
      if name.startswith(_TMP_PREFIX) and "-replaced-" in name:
        shutil.rmtree(self.folder / name, ignore_errors=True)
    self._apply_retention()

  def _write_file(self, path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
      f.write(data)
      if self.durable:
        f.flush()
        os.fsync(f.fileno())

  def _apply_retention(self) -> None:
    """Keeps this run's newest `max_to_keep` local steps and its newest healthy one.

    This run's abandoned steps (hidden) go too; other runs' steps are left alone.
    """
    ours = [s for s in self.listing() if s.ours]
    usable = [s for s in ours if s.unusable is None]
    keep = {s.step for s in usable[-self.max_to_keep :]}
    keep.update(s.step for s in [s for s in usable if s.healthy][-1:])
    for s in ours:
      if s.step not in keep:
        shutil.rmtree(self.folder / f"ckpt_{s.step}", ignore_errors=True)
    hidden = self._hidden()
    if hidden and not set(hidden) <= keep:
      self._set_hidden([h for h in hidden if h in keep])

  def wait(self) -> None:
    """Waits for the local save in flight (sending what is left of its copy to peers); raises its error on every process.

    When the copy between processes itself stops part-way (a timeout, a
    chunk that could not be dispatched), the processes may have dispatched
    different chunks: this process raises at once (`ProcessTimeoutError`, or
    `BackgroundSaveError` saying the run cannot go on), the others once no
    chunk arrived for `timeout_secs`, and the step is never committed.
    """
    pending, self._pending = self._pending, None
    if pending is None:
      return
    step, future, copy = pending.step, pending.future, pending.copy
    if copy is not None:
      try:
        copy.finish()  # a collective: every process dispatches what is left, in the same order
      except BaseException as e:
        copy.cancel()  # the background work stops, and never commits the step
        if isinstance(e, Exception) and not isinstance(e, ProcessTimeoutError):
          raise BackgroundSaveError(
            f"The local-tier save of step {step} into {self.folder} failed: process {multihost.process_index()}: "
            f"the copy between processes stopped part-way ({type(e).__name__}: {e}); the processes' collectives may "
            "no longer match: the run cannot go on. Exit this process and restart the job.",
            step=step,
          ) from e
        raise
    error = None
    try:
      future.result()
    except Exception as e:  # pylint: disable=broad-exception-caught  # shared with every process below
      error = f"process {multihost.process_index()}: {type(e).__name__}: {e}"
    if errors := self._agree(error):
      raise BackgroundSaveError(f"The local-tier save of step {step} into {self.folder} failed: {'; '.join(errors)}", step=step)

  def close(self) -> None:
    self.wait()

  def clear(self) -> list[Step]:
    """Deletes this run's local steps in this process's folder (`delete_all_steps`); returns them."""
    self.wait()
    ours = [s.step for s in self.listing() if s.ours]
    for step in ours:
      shutil.rmtree(self.folder / f"ckpt_{step}", ignore_errors=True)
    self._set_hidden([])
    return ours

  def hide_newer_than(self, step: Step) -> None:
    """`step` was restored into a target: this run's newer local steps are an abandoned continuation, never restored."""
    newer = [s.step for s in self.listing() if s.unusable is None and s.step > step]
    if newer:
      try:
        self._set_hidden(sorted({*self._hidden(), *newer}))
      except OSError as e:
        log.warning("kckpt: could not record in %s that local steps %s are abandoned: %s", self.folder, newer, e)

  # -- Restoring --------------------------------------------------------------

  def restore_newest(self, target: PyTree, *, persistent_latest: Step | None) -> tuple[Step, PyTree] | None:
    """The newest local step, not older than `persistent_latest`, that every process can restore.

    Every process must call it. Returns None (and logs why) when the
    persistent tier must be used instead.
    """
    self.wait()
    n = multihost.process_count()
    listing = self.listing()
    mine = {
      "steps": {str(s.step): list(s.owners) for s in listing if s.unusable is None},
      "unusable": [f"step {s.step}: {s.unusable}" for s in listing if s.unusable is not None][-3:],
    }
    everyone = self._exchange("local_tier_inventory", mine) if n > 1 else {0: mine}
    candidates, why = _candidates(everyone, n, persistent_latest)
    for step in candidates[:_MAX_TRIES]:
      value, failures = self._try(step, everyone, target)
      if not failures:
        log.info("kckpt: restoring step %d from the local tier (%s)", step, self.folder)
        return step, value
      log.warning("kckpt: local step %d cannot be restored: %s", step, "; ".join(failures))
      why = f"local step {step} could not be restored"
    log.info("kckpt: restoring from the persistent tier: %s", why)
    return None

  def _try(self, step: Step, everyone: Mapping[int, Any], target: PyTree) -> tuple[PyTree, list[str]]:
    """Restores local `step` into `target` on every process: (the value, []) or (None, what failed where)."""
    n, me = multihost.process_count(), multihost.process_index()
    holders = {p: sorted(int(q) for q in everyone if p in everyone[q]["steps"].get(str(step), ())) for p in range(n)}
    unpacked, error = None, None
    if me in holders[me]:
      try:
        unpacked = self._read(step, me)
      except Exception as e:  # pylint: disable=broad-exception-caught  # shared with every process below
        error = str(e)
    own_ok = self._exchange("local_tier_own", unpacked is not None) if n > 1 else {0: unpacked is not None}
    need = {p for p in range(n) if not own_ok.get(p)}
    # Each process that lacks its shards gets them from the first peer holding a copy, one shift at a time.
    giver = {p: next((q for q in holders[p] if q != p), None) for p in need}
    for by in sorted({(p - q) % n for p, q in giver.items() if q is not None}):
      owner = (me + by) % n
      send = np.zeros(0, np.uint8)
      if giver.get(owner) == me:
        try:
          send = self._read_buffer(step, owner)
        except Exception as e:  # pylint: disable=broad-exception-caught  # this peer then sends nothing
          log.warning("kckpt: the copy of process %d's shards of local step %d here is unusable: %s", owner, step, e)
      try:
        got = _peers.shift(send, by, timeout_secs=self.timeout_secs)
      except _peers.PeerTransferError as e:
        return None, [str(e)]
      if me in need and giver.get(me) == (me - by) % n and got.size:
        try:
          unpacked, error = fmt.unpack(got), None
        except fmt.LocalTierUnusable as e:
          error = f"the copy sent by process {(me - by) % n}: {e}"
    missing = None if unpacked is not None else f"process {me}: {error or 'neither its folder nor a peer holds its shards'}"
    if missing_anywhere := self._agree(missing):  # before placing: placing may itself be a collective
      return None, missing_anywhere
    value = None
    try:
      assert unpacked is not None
      value = fmt.assemble(unpacked, target)
    except Exception as e:  # pylint: disable=broad-exception-caught  # shared with every process below
      error = f"process {me}: {e}" if isinstance(e, fmt.LocalTierUnusable) else f"process {me}: {type(e).__name__}: {e}"
    else:
      error = None
    return value, self._agree(error)

  def _read_buffer(self, step: Step, owner: int) -> np.ndarray:
    """The verified packed buffer of `owner`'s shards of `step` in this folder."""
    return self._read_checked(step, owner)[0]

  def _read(self, step: Step, owner: int) -> fmt.Unpacked:
    return self._read_checked(step, owner)[1]

  def _read_checked(self, step: Step, owner: int) -> tuple[np.ndarray, fmt.Unpacked]:
    folder = self.folder / f"ckpt_{step}"
    where = f"{folder}/p{owner}.*.bin"
    try:
      index = json.loads((folder / f"p{owner}.crc.json").read_bytes())
      buffer = fmt.read_parts(folder, owner, index["parts"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise fmt.LocalTierUnusable(f"{where}: {e}") from e
    return buffer, fmt.verify(buffer, index, where=where)


def _in_background(fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
  """Runs `fn(*args)` in a new daemon thread: a copy stuck on a dead peer never holds up the interpreter's exit.

  (A normal exit still waits for it: the exit hook of `kckpt._session` calls `close`.)
  """
  future: concurrent.futures.Future[None] = concurrent.futures.Future()

  def run() -> None:
    if not future.set_running_or_notify_cancel():
      return
    try:
      fn(*args)
    except BaseException as e:  # pylint: disable=broad-exception-caught  # handed to the waiter
      future.set_exception(e)
    else:
      future.set_result(None)

  threading.Thread(target=run, name="kckpt-local-tier", daemon=True).start()
  return future


def _read_json(path: Path) -> dict[str, Any]:
  try:
    value = json.loads(path.read_bytes())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _fsync_dir(folder: Path) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _candidates(everyone: Mapping[int, Any], n: int, persistent_latest: Step | None) -> tuple[list[Step], str]:
  """The local steps whose shards of every process are held somewhere, newest first, and otherwise why there is none."""
  held: dict[Step, set[int]] = {}
  for inventory in everyone.values():
    for step, owners in inventory["steps"].items():
      held.setdefault(int(step), set()).update(owners)
  complete = sorted((s for s, owners in held.items() if owners >= set(range(n))), reverse=True)
  if persistent_latest is not None:
    newer = [s for s in complete if s >= persistent_latest]
    if complete and not newer:
      return [], f"the newest local step ({complete[0]}) is older than the persistent step {persistent_latest}"
    complete = newer
  if complete:
    return complete, ""
  if held:
    newest = max(held)
    return [], f"local step {newest} lacks the shards of processes {sorted(set(range(n)) - held[newest])}"
  notes = [u for inventory in everyone.values() for u in inventory["unusable"]]
  return [], "no local step of this run" + (f" ({'; '.join(notes[:3])})" if notes else "")
