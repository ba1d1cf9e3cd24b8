"""The run index: lists a run's steps, resolves step names, reads per-step details.

One place answers "which step does ``"best"`` (or ``-1``, or a tag) mean?" for
`Checkpointer`, `PartialLoader` and the ``kckpt`` command. Every answer is
local to this process (a listing and small files, never a collective);
processes agree only inside calls every process makes (`Checkpointer.restore`
shares the primary's answer through `agreed_resolution`).

Listing and naming need only the standard library: the
``kckpt`` command's ``ls``, ``watch`` and ``gc`` import no JAX through here
(`kckpt.multihost` is imported by `agreed_resolution` alone).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import operator
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from kckpt import _fs
from kckpt import _layout
from kckpt import _orbax
from kckpt import policies
from kckpt._types import EPath, Step, StepSpec
from kckpt.errors import CheckpointNotFoundError

# Words a step may be named by, besides numbers and tags.
STEP_WORDS = ("latest", "best", "last_good")


@dataclasses.dataclass(frozen=True)
class StepListing:
  """One listing of a ``checkpoints/`` folder.

  Attributes:
    finished: sorted steps whose folders are complete.
    unfinished: names of folders being written (or left by a crash).
  """

  finished: tuple[Step, ...] = ()
  unfinished: tuple[str, ...] = ()


def list_steps(checkpoints: EPath, *, known_finished: frozenset[Step] = frozenset()) -> StepListing:
  """Lists the finished and unfinished step folders of `checkpoints`.

  One directory listing. On object stores, steps not in `known_finished` are
  checked for their commit marker.
  """
  try:
    names = _fs.list_names(checkpoints)
  except (FileNotFoundError, NotADirectoryError):
    return StepListing()
  check_marker = _orbax.needs_commit_marker(checkpoints)
  finished, unfinished = [], []
  for name in names:
    step = _layout.parse_step(name)
    if step is None:
      if _orbax.is_temporary_name(name):
        unfinished.append(name)
      continue
    if check_marker and step not in known_finished and not _orbax.is_committed(checkpoints / name):
      unfinished.append(name)
      continue
    finished.append(step)
  return StepListing(finished=tuple(sorted(finished)), unfinished=tuple(sorted(unfinished)))


@dataclasses.dataclass(frozen=True)
class StepDetails:
  """What is known of one finished step without reading its arrays.

  Attributes:
    step: the step.
    path: its folder.
    time: the step's time (UTC): when `save` was called, as recorded in the
      step (for steps written by other code, Orbax's commit time).
    metrics: the metrics given to `save`, if any.
    items: names of the items in the step (bookkeeping folders included), each
      with its format (``"pytree"`` or ``"json"``).
    tag: the user tag given to `save`, if any.
    checksums: how its array data is checksummed (``"crc32c-shards"``: a
      CRC32C of each saved shard, checked by every kckpt read; ``"crc32c"``
      in steps of earlier development versions: per chunk, checked by TensorStore), or None: saved without (by plain
      Orbax, older kckpt, or with ``StorageOptions(checksums=False)``).
    provenance: what made the step, as recorded at `save`: the versions of
      kckpt, jax, jaxlib, orbax and tensorstore (keys ``kckpt``, ``jax``,
      ``jaxlib``, ``orbax``, ``tensorstore``), ``python``,
      ``process_count``, ``devices`` (platform, kind, count), the primary's
      ``host``, ``git`` (the training script's commit and whether its tree
      was dirty; None outside git), the saved arrays' ``shardings`` (sharding
      -> number of leaves) and the ``config`` given to `save`. Empty for
      steps written by other code.
    healthy: False when the step was marked unhealthy at save: a floating
      leaf held NaN or infinity (`health` names them), or the Checkpointer's
      `health_fn` said so. True otherwise, steps saved without a health
      record (other code, older kckpt) included.
    health: the health record as saved (``healthy``, ``nonfinite_leaves``,
      ``health_fn``), or None when there is none.
  """

  step: Step
  path: EPath
  time: datetime.datetime | None
  metrics: Mapping[str, Any] | None
  items: Mapping[str, str]
  tag: str | None = None
  checksums: str | None = None
  provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  health: Mapping[str, Any] | None = None

  @property
  def healthy(self) -> bool:
    return health_says_healthy(self.health)

  @property
  def user_items(self) -> tuple[str, ...]:
    return tuple(name for name in self.items if name not in _layout.RESERVED_ITEMS)

  @property
  def record(self) -> policies.StepRecord:
    """What retention needs of the step."""
    return policies.StepRecord(
      step=self.step, time=self.time.timestamp() if self.time else None, metrics=self.metrics, healthy=self.healthy
    )


def health_says_healthy(health: Mapping[str, Any] | None) -> bool:
  """Whether a step with this health record counts as healthy (no record: yes)."""
  return health is None or health.get("healthy") is not False


def read_step_details(checkpoints: EPath, step: Step) -> StepDetails:
  """Time, metrics, items and tag of one step (its small files only)."""
  path = _layout.step_dir(checkpoints, step)
  metadata = _orbax.read_step_metadata(path)
  return StepDetails(
    step=step,
    path=path,
    time=_orbax.step_time(path, metadata),
    metrics=_orbax.read_step_metrics(path, metadata),
    items=_orbax.item_formats(path, metadata),
    tag=_orbax.step_tag(metadata),
    checksums=_orbax.step_checksums(metadata),
    provenance=_orbax.step_provenance(metadata),
    health=_orbax.read_step_health(path),
  )


def check_step(step: Any) -> Step:
  """`step` as a non-negative int (ValueError naming it otherwise)."""
  if isinstance(step, (bool, float)) or not hasattr(step, "__index__"):
    raise ValueError(f"step must be a non-negative int, got {type(step).__name__}: {step!r}")
  step = operator.index(step)
  if step < 0:
    raise ValueError(f"step must be a non-negative int, got {step}")
  return step


def check_tag(tag: str | None) -> None:
  """A tag is a name that cannot be read as a step number or word."""
  if tag is None:
    return
  if not isinstance(tag, str) or not tag or tag in STEP_WORDS or tag.lstrip("-").isdigit():
    raise ValueError(f"tag must be a non-empty name other than {', '.join(map(repr, STEP_WORDS))} or a number, got {tag!r}")


def parse_step_name(text: str) -> StepSpec:
  """A step name as typed on a command line: ``"10"`` -> 10, ``"-1"`` -> -1, words and tags stay strings."""
  try:
    return int(text)
  except ValueError:
    return text


class RunIndex:
  """The steps of one run's ``checkpoints/`` folder, listed and named.

  Listings are cached until `invalidate()` (a writer invalidates at each save;
  readers ask for a fresh one where staleness matters). Per-step records
  (metrics and time, for retention and ``"best"``) are read once per step.
  Thread-safe; never writes.

  >>> import tempfile
  >>> index = RunIndex(_fs.as_path(tempfile.mkdtemp()))
  >>> index.finished(), index.resolve("latest")
  ((), None)
  """

  def __init__(self, checkpoints: EPath, *, retention: policies.RetentionPolicy | None = None):
    self.checkpoints = checkpoints
    self.retention = retention or policies.RetentionPolicy()
    self._lock = threading.RLock()
    self._listing: StepListing | None = None
    # Steps seen finished by an earlier listing: on object stores their commit
    # markers are not asked for again, so a poll is one prefix listing.
    self._known_finished: frozenset[Step] = frozenset()
    self._records: dict[Step, policies.StepRecord] = {}
    # Records a writer gave (`remember`): kept until it `forget`s them, even while a
    # listing does not show the step yet (it is being saved).
    self._remembered: set[Step] = set()
    self._health: dict[Step, bool] = {}  # step -> healthy, read once per step (or told by the writer)

  # -- Listing ----------------------------------------------------------------

  def listing(self, *, fresh: bool = False) -> StepListing:
    """The folder's steps; listed again when `fresh` or after `invalidate()`."""
    with self._lock:
      if fresh or self._listing is None:
        listing = list_steps(self.checkpoints, known_finished=self._known_finished)
        self._known_finished = frozenset(listing.finished)
        for step in set(self._records) - self._known_finished - self._remembered:
          self._records.pop(step, None)  # a step read from disk and now missing is forgotten
        self._listing = listing
      return self._listing

  def finished(self, *, fresh: bool = False) -> tuple[Step, ...]:
    return self.listing(fresh=fresh).finished

  def invalidate(self) -> None:
    """Forgets the cached listing (the next call lists the folder again)."""
    with self._lock:
      self._listing = None

  # -- Per-step records ---------------------------------------------------------

  def record(self, step: Step) -> policies.StepRecord:
    """What retention needs of `step` (metrics, time), read from disk once when not known."""
    with self._lock:
      record = self._records.get(step)
    if record is None:
      path = _layout.step_dir(self.checkpoints, step)
      ranks, spaces = self.retention.ranks_by_metric, bool(self.retention.keep_time_interval_secs)
      metadata = _orbax.read_step_metadata(path) if ranks or spaces else None  # holds kckpt's copy of the metrics
      metrics = _orbax.read_step_metrics(path, metadata) if ranks else None
      when = _orbax.step_time(path, metadata) if spaces else None
      record = policies.StepRecord(step=step, time=when.timestamp() if when else None, metrics=metrics)
      with self._lock:
        self._records[step] = record
    return record

  def records(self, steps: Sequence[Step]) -> list[policies.StepRecord]:
    """`record` of each of `steps`; on object stores the unknown ones are read 16 at a time (each is a request)."""
    with self._lock:
      missing = [s for s in steps if s not in self._records]
    if len(missing) > 1 and not _fs.is_local(self.checkpoints):
      with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(self.record, missing))
    return [self.record(s) for s in steps]

  def remember(self, record: policies.StepRecord) -> None:
    """Records what a writer knows of a step it is saving (no need to read it back)."""
    with self._lock:
      self._records[record.step] = record
      self._remembered.add(record.step)

  def forget(self, step: Step) -> None:
    with self._lock:
      self._records.pop(step, None)
      self._remembered.discard(step)
      self._health.pop(step, None)

  def healthy(self, step: Step) -> bool:
    """Whether `step` was not marked unhealthy at save (its small health file, read once)."""
    with self._lock:
      known = self._health.get(step)
    if known is None:
      record = _orbax.read_step_health(_layout.step_dir(self.checkpoints, step))
      known = health_says_healthy(record)
      if record is not None:  # no record (yet: a step being saved, or none at all) is read again next time
        with self._lock:
          self._health[step] = known
    return known

  def remember_health(self, step: Step, healthy: bool) -> None:
    """What a writer decided of the step it is committing."""
    with self._lock:
      self._health[step] = healthy

  def last_good_step(self) -> Step | None:
    """The newest healthy step (health files are read newest first, until one is healthy)."""
    finished = self.finished(fresh=True)
    return next((s for s in reversed(finished) if self.healthy(s)), None)

  def details(self, step: StepSpec = -1) -> StepDetails:
    """Time, metrics, items and tag of the step `step` names."""
    return read_step_details(self.checkpoints, self.require(step))

  # -- Naming steps -------------------------------------------------------------

  def best_step(self) -> Step | None:
    """The best step by the retention policy's metric (the newest without one); None if unscored."""
    finished = self.finished(fresh=True)
    return policies.best_step(self.retention, self.records(finished))

  def step_with_tag(self, tag: str) -> Step:
    """The newest step saved with `tag` (reads the small metadata file of steps, newest first)."""
    finished = self.finished(fresh=True)
    for step in reversed(finished):
      if _orbax.step_tag(_orbax.read_step_metadata(_layout.step_dir(self.checkpoints, step))) == tag:
        return step
    raise CheckpointNotFoundError(
      f"No step of {self.checkpoints} has the tag {tag!r} (steps: {_layout.steps_repr(finished)});"
      " a step is an int, -1, 'latest', 'best' or a tag given to save",
      available_steps=finished,
    )

  def resolve(self, step: StepSpec) -> Step | None:
    """The step number that `step` names; None when it names the newest or best and there is none.

    `step`: an int, -1 or ``"latest"`` (the newest), ``"best"``,
    ``"last_good"`` (the newest step not marked unhealthy), or a tag.
    A number is returned as it is (see `require` to check that it exists).
    """
    if isinstance(step, str):
      if step == "latest":
        step = -1
      elif step == "best":
        return self.best_step()
      elif step == "last_good":
        return self.last_good_step()
      else:
        return self.step_with_tag(step)
    if isinstance(step, int) and not isinstance(step, bool) and step == -1:
      finished = self.finished(fresh=True)
      return finished[-1] if finished else None
    return check_step(step)

  def require(self, step: StepSpec) -> Step:
    """Like `resolve`, but the step must exist (`CheckpointNotFoundError` otherwise)."""
    resolved = self.resolve(step)
    if resolved is None:
      what = self.missing_what(step)
      raise CheckpointNotFoundError(f"No {what} found in {self.checkpoints}")
    return self.require_exists(resolved)

  def missing_what(self, step: StepSpec) -> str:
    """What is missing when `step` resolves to nothing: ``"checkpoint"``, or why a word names no step."""
    if step == "best" and self.finished():
      return "scored step (no step has the best metric)"
    if step == "last_good" and self.finished():
      return "healthy step (every step was marked unhealthy at save)"
    return "checkpoint"

  def require_exists(self, step: Step) -> Step:
    finished = self.finished()
    if step not in finished:
      finished = self.finished(fresh=True)
    if step not in finished:
      raise CheckpointNotFoundError(
        f"Step {step} is not in {self.checkpoints} (steps: {_layout.steps_repr(finished)})",
        available_steps=finished,
      )
    return step


def agreed_resolution(index: RunIndex, step: StepSpec, *, timeout_secs: float) -> Step | None:
  """What `step` names on the primary process, on every process (every process must call it).

  The one multi-process rule for step names: the primary resolves, the others
  take its answer, so ``"latest"``, ``"best"`` or a tag name one step on all
  of them even while a writer adds steps. An error there is raised everywhere.
  """
  from kckpt import multihost  # pylint: disable=import-outside-toplevel  # imports JAX: only where processes agree

  if multihost.process_count() == 1:
    return index.resolve(step)
  try:
    local, error = index.resolve(step), None
  except Exception as e:  # pylint: disable=broad-exception-caught  # shared, then raised on every process
    local, error = None, e
  shared, message = multihost.primary_value(
    [local, None if error is None else f"{type(error).__name__}: {error}"],
    timeout_secs=timeout_secs,
    what=f"restore(step={step!r})",
  )
  if error is not None and multihost.is_primary():
    raise error
  if message is not None:
    raise CheckpointNotFoundError(f"On the primary process: {message}", available_steps=index.finished())
  return shared
