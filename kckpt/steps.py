"""The on-disk layout of a run: naming step folders, listing them fast, per-step details.

A run's checkpoints live in ``<workdir>/checkpoints/ckpt_<step>/`` (Kauldron's
layout). Orbax writes a step into a temporary folder
(``ckpt_<step>.orbax-checkpoint-tmp...``) and renames it when it is finished,
so on a local or POSIX file system a folder named exactly ``ckpt_<step>`` is a
finished step. On object stores without atomic rename (``gs://``), Orbax writes
the final folder directly and marks it finished with ``commit_success.txt``
last; there the marker is checked, once per step (finished steps are cached).

Listing therefore costs one directory listing plus name parsing; per-step
details (time, metrics, items, size) are read only by `read_step_details`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from kckpt import cloud
from kckpt._types import PathLike, Step

CHECKPOINTS_FOLDER = "checkpoints"
STEP_PREFIX = "ckpt"
DEFAULT_ITEM = "default"
METRICS_ITEM = "metrics"  # Orbax's own name: `CheckpointManager.metrics(step)` reads it.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"

# Items that are bookkeeping, not user state.
RESERVED_ITEMS = frozenset({METRICS_ITEM, "descriptor", "metadata_internal"})

_STEP_NAME = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
# Object stores whose "rename" is a copy: Orbax marks finished steps with a file instead.
_COMMIT_FILE_SCHEMES = ("gs://", "s3://")


def checkpoints_dir(workdir: PathLike) -> epath.Path:
  """The folder that holds the step folders of the run at `workdir`."""
  cloud.prepare(workdir)
  return epath.Path(workdir) / CHECKPOINTS_FOLDER


def step_dir(checkpoints: epath.Path, step: Step) -> epath.Path:
  """The folder of `step` (whether or not it exists)."""
  return checkpoints / f"{STEP_PREFIX}_{step}"


def parse_step(name: str) -> Step | None:
  """``"ckpt_12"`` -> ``12``; anything else (temporary folders too) -> ``None``."""
  match = _STEP_NAME.match(name)
  return int(match.group(1)) if match else None


def uses_commit_marker(path: PathLike) -> bool:
  return str(path).startswith(_COMMIT_FILE_SCHEMES)


def _list_names(directory: epath.Path) -> list[str]:
  if "://" not in str(directory):
    return os.listdir(directory)  # 10x faster than building a Path per entry
  cloud.prepare(directory)
  return [p.name for p in directory.iterdir()]


@dataclasses.dataclass(frozen=True)
class StepListing:
  """One listing of a ``checkpoints/`` folder.

  Attributes:
    finished: sorted steps whose folders are complete.
    unfinished: names of folders being written (or left by a crash).
  """

  finished: tuple[Step, ...] = ()
  unfinished: tuple[str, ...] = ()


def list_steps(
    checkpoints: epath.Path, *, known_finished: frozenset[Step] = frozenset()
) -> StepListing:
  """Lists the finished and unfinished step folders of `checkpoints`.

  One directory listing. On object stores, steps not in `known_finished` are
  checked for their commit marker.
  """
  try:
    names = _list_names(checkpoints)
  except (FileNotFoundError, NotADirectoryError):
    return StepListing()
  check_marker = uses_commit_marker(checkpoints)
  finished, unfinished = [], []
  for name in names:
    step = parse_step(name)
    if step is None:
      if name.startswith(f"{STEP_PREFIX}_") and TMP_MARKER in name:
        unfinished.append(name)
      continue
    if check_marker and step not in known_finished:
      if not (checkpoints / name / COMMIT_MARKER).exists():
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
    time: when it was committed (UTC), if recorded.
    metrics: the metrics given to `save`, if any.
    items: names of the items in the step, and the Orbax handler of each.
    tag: the user tag given to `save`, if any.
  """

  step: Step
  path: epath.Path
  time: datetime.datetime | None
  metrics: Mapping[str, Any] | None
  items: Mapping[str, str]
  tag: str | None = None

  @property
  def user_items(self) -> tuple[str, ...]:
    return tuple(name for name in self.items if name not in RESERVED_ITEMS)


def read_step_metadata(path: epath.Path) -> dict[str, Any]:
  """The step's ``_CHECKPOINT_METADATA`` (empty when absent or unreadable)."""
  try:
    return json.loads((path / STEP_METADATA_FILE).read_text())
  except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
    return {}


def read_step_metrics(path: epath.Path) -> Mapping[str, Any] | None:
  """The metrics saved with the step at `path`, or None."""
  try:
    return json.loads((path / METRICS_ITEM / METRICS_ITEM).read_text())
  except (FileNotFoundError, NotADirectoryError):
    return None


def read_step_time(path: epath.Path, metadata: Mapping[str, Any] | None = None) -> datetime.datetime | None:
  """When the step at `path` was committed (or started, for older checkpoints)."""
  if metadata is None:
    metadata = read_step_metadata(path)
  nsecs = metadata.get("commit_timestamp_nsecs") or metadata.get("init_timestamp_nsecs")
  if nsecs:
    return datetime.datetime.fromtimestamp(nsecs / 1e9, tz=datetime.timezone.utc)
  try:
    return datetime.datetime.fromtimestamp(path.stat().mtime, tz=datetime.timezone.utc)
  except (FileNotFoundError, OSError, AttributeError):
    return None


def read_item_names(path: epath.Path, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Item name -> Orbax handler name for the step at `path`.

  Taken from the step metadata; steps written without it (older Orbax) fall
  back to the sub-folders, with the handler guessed from their files.
  """
  if metadata is None:
    metadata = read_step_metadata(path)
  handlers = metadata.get("item_handlers")
  if isinstance(handlers, Mapping) and handlers:
    return {name: str(handler) for name, handler in handlers.items()}
  items = {}
  for child in path.iterdir():
    if child.is_dir():
      items[child.name] = "PyTreeCheckpointHandler" if (child / "_METADATA").exists() else "JsonCheckpointHandler"
  return items


KCKPT_METADATA_KEY = "kckpt"  # kckpt's entry in Orbax's per-step custom metadata


def step_tag(metadata: Mapping[str, Any]) -> str | None:
  custom = metadata.get("custom_metadata") or {}
  own = custom.get(KCKPT_METADATA_KEY) if isinstance(custom, Mapping) else None
  return own.get("tag") if isinstance(own, Mapping) else None


def read_step_details(checkpoints: epath.Path, step: Step) -> StepDetails:
  path = step_dir(checkpoints, step)
  metadata = read_step_metadata(path)
  return StepDetails(
      step=step,
      path=path,
      time=read_step_time(path, metadata),
      metrics=read_step_metrics(path),
      items=read_item_names(path, metadata),
      tag=step_tag(metadata),
  )


def folder_size(path: epath.Path) -> int:
  """Bytes under `path` (walks the folder: call only when asked for a size)."""
  if "://" in str(path):
    # One recursive listing through fsspec (etils' walk passes s3fs an
    # argument it does not take, and a walk would list folder by folder).
    import fsspec  # pylint: disable=import-outside-toplevel

    cloud.prepare(path)
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
      raise FileNotFoundError(f"No such step folder: {path}")
    return int(fs.du(root, total=True))
  total = 0
  for root, _, files in path.walk():
    for name in files:
      try:
        total += (root / name).stat().length
      except (FileNotFoundError, OSError):
        pass  # deleted while walking
  return total


def steps_repr(steps: Sequence[Step], limit: int = 8) -> str:
  """``[0, 10, 20, ..., 990]``: a short form of a long list of steps."""
  if len(steps) <= limit:
    return str(list(steps))
  head = ", ".join(map(str, steps[: limit // 2]))
  tail = ", ".join(map(str, steps[-(limit // 2) :]))
  return f"[{head}, ... {len(steps) - limit} more ..., {tail}]"


DELETING_SUFFIX = f"{TMP_MARKER}-deleting"


def remove_step_folder(checkpoints: epath.Path, step: Step) -> bool:
  """Deletes one finished step folder so that no reader ever sees half of it.

  On a local or POSIX file system the folder is first renamed to
  ``ckpt_<step>.orbax-checkpoint-tmp-deleting`` (atomic: listings stop
  reporting the step at once; a leftover after a crash is an unfinished folder
  that Orbax cleans up), then removed. On object stores, where a rename is a
  copy, the commit marker goes first, then the files. For tools that delete
  steps without an Orbax manager (the ``kckpt gc`` command).

  Returns:
    False when the step was not there (deleted meanwhile by someone else).
  """
  path = step_dir(checkpoints, step)
  if uses_commit_marker(path):
    if not path.exists():
      return False
    (path / COMMIT_MARKER).unlink(missing_ok=True)
    path.rmtree(missing_ok=True)
    return True
  doomed = checkpoints / f"{path.name}{DELETING_SUFFIX}"
  if doomed.exists():  # left by an earlier deletion that was interrupted
    doomed.rmtree(missing_ok=True)
  try:
    os.rename(path, doomed)
  except FileNotFoundError:
    return False
  doomed.rmtree(missing_ok=True)
  return True


RETENTION_FILE = "RETENTION.json"  # the writer's retention rules, for tools such as `kckpt gc`


def write_retention_rules(checkpoints: epath.Path, rules: Mapping[str, Any]) -> None:
  """Records the retention rules a writer applies (replacing those of an earlier writer)."""
  tmp = checkpoints / f".{RETENTION_FILE}.tmp"
  tmp.write_text(json.dumps(dict(rules), indent=1, sort_keys=True))
  if "://" in str(checkpoints):
    (checkpoints / RETENTION_FILE).write_text(tmp.read_text())
    tmp.unlink()
  else:
    os.replace(tmp, checkpoints / RETENTION_FILE)


def read_retention_rules(checkpoints: epath.Path) -> dict[str, Any] | None:
  """The rules recorded by the run's writer, or None."""
  try:
    return json.loads((checkpoints / RETENTION_FILE).read_text())
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
    return None
