"""Orbax's files inside a run's folder: how to tell a finished step, and its small metadata files.

Orbax writes a step into a temporary folder (``ckpt_<step>.orbax-checkpoint-tmp...``)
and renames it when finished, so on a local or POSIX file system a folder named
exactly ``ckpt_<step>`` is a finished step. On object stores without atomic
rename (``gs://``, ``s3://``) the final folder is written in place and
``commit_success.txt`` is written last. Each step holds ``_CHECKPOINT_METADATA``
(item handlers, commit time, custom metadata) and, with metrics,
``metrics/metrics``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kckpt import _fs
from kckpt import _layout
from kckpt._types import EPath, Step

STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
# The step's ``checksums`` entry: how its array data is checksummed.
CRC32C_SHARDS = "crc32c-shards"  # a CRC32C of each saved shard in `CHECKSUMS_FILE`, checked by kckpt's reads
CRC32C_CODEC = "crc32c"  # earlier development versions: a Zarr v3 ``crc32c`` codec on each chunk, checked by TensorStore itself
# kckpt's own files in a step folder, written just before the commit (see `_commit.before_commit`).
HEALTH_FILE = "_KCKPT_HEALTH.json"  # {"healthy": bool, "nonfinite_leaves": [...], "health_fn": bool | None}
# {item: {parameter name: {"dtype", "shape", "shards": [[box, crc32c], ...]}}}: see `_checksums`
CHECKSUMS_FILE = "_KCKPT_CHECKSUMS.json"
LEAF_STATS_FILE = "_KCKPT_LEAF_STATS.json"  # {item: {parameter name: {"norm", "min", "max", "mean", "nonfinite", "size"}}}
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
METRICS_ITEM = "metrics"  # Orbax's own place for a step's metrics: ``metrics/metrics``
ITEM_METADATA_FILE = "_METADATA"  # in a pytree item's folder
DELETING_SUFFIX = f"{TMP_MARKER}-deleting"
KCKPT_METADATA_KEY = "kckpt"  # kckpt's entry in Orbax's per-step custom metadata

ItemFormat = Literal["pytree", "json"]

log = logging.getLogger("kckpt")


def is_temporary_name(name: str) -> bool:
  """Whether `name` is a step folder being written (or left by a crash, or being deleted)."""
  return _layout.is_step_like(name) and TMP_MARKER in name


def needs_commit_marker(path: Any) -> bool:
  """Whether finished steps under `path` are told by their commit file (object stores)."""
  return _fs.is_object_store(path)


def is_committed(step_path: EPath) -> bool:
  """On object stores: whether the step's commit file is there."""
  return (step_path / COMMIT_MARKER).exists()


def _read_json(folder: EPath, *names: str) -> Any:
  """The JSON value of a small file under `folder`.

  Local files are read as bytes, unbuffered, through `open` on a joined
  string: a listing reads three files per step, and epath's (or pathlib's)
  `/` and `read_text`, or a buffered reader, cost more than the read itself.
  """
  if _fs.is_local(folder):
    with open(os.path.join(os.fspath(folder), *names), "rb", buffering=0) as f:
      return json.loads(f.read())
  return json.loads(folder.joinpath(*names).read_text())


def read_step_metadata(path: EPath) -> dict[str, Any]:
  """The step's ``_CHECKPOINT_METADATA`` (empty when absent or unreadable)."""
  try:
    value = _read_json(path, STEP_METADATA_FILE)
  except (FileNotFoundError, NotADirectoryError):
    return {}
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    log.warning("Step metadata %s is not valid JSON (%s): its tag and time are unknown.", path / STEP_METADATA_FILE, e)
    return {}
  return value if isinstance(value, dict) else {}


def read_step_metrics(path: EPath, metadata: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
  """The metrics saved with the step at `path`, or None.

  Given the step's `metadata` (`read_step_metadata`) of a step kckpt wrote,
  kckpt's copy of the metrics there is used: a listing reads one file less
  per step. Otherwise (and for steps written by other code) Orbax's
  ``metrics/metrics`` is read.
  """
  if metadata is not None:
    own = _kckpt_entry(metadata)
    if "metrics" in own:
      return own["metrics"] if isinstance(own["metrics"], dict) else None
  try:
    return _read_json(path, METRICS_ITEM, METRICS_ITEM)
  except (FileNotFoundError, NotADirectoryError):
    return None


def step_time(path: EPath, metadata: Mapping[str, Any] | None = None) -> datetime.datetime | None:
  """The step's time, UTC: when its `save` was called, as kckpt recorded it in the step.

  The one definition every reader uses (retention's time rule in the live
  writer, a reopened `Checkpointer`, ``kckpt ls`` and ``gc``). Steps written
  by other code fall back to Orbax's commit (or start) time, then the
  folder's modification time.
  """
  if metadata is None:
    metadata = read_step_metadata(path)
  own = _kckpt_entry(metadata)
  if isinstance(own.get("time"), (int, float)) and not isinstance(own.get("time"), bool):
    return datetime.datetime.fromtimestamp(own["time"], tz=datetime.UTC)
  nsecs = metadata.get("commit_timestamp_nsecs") or metadata.get("init_timestamp_nsecs")
  if nsecs:
    return datetime.datetime.fromtimestamp(nsecs / 1e9, tz=datetime.UTC)
  try:
    return datetime.datetime.fromtimestamp(_fs.mtime(path), tz=datetime.UTC)
  except (FileNotFoundError, OSError):
    return None


def item_format(handler_name: str) -> ItemFormat:
  """``"json"`` or ``"pytree"`` from the name of the Orbax handler that wrote an item."""
  return "json" if "Json" in handler_name else "pytree"


def item_formats(path: EPath, metadata: Mapping[str, Any] | None = None) -> dict[str, ItemFormat]:
  """Item name -> format for the step at `path`, bookkeeping folders included.

  Taken from the step metadata; steps written without it (older Orbax) fall
  back to the sub-folders, with the format guessed from their files.
  """
  if metadata is None:
    metadata = read_step_metadata(path)
  handlers = metadata.get("item_handlers")
  if isinstance(handlers, dict) and handlers:
    return {name: item_format(str(handler)) for name, handler in handlers.items()}
  items: dict[str, ItemFormat] = {}
  for child in path.iterdir():
    if child.is_dir():
      items[child.name] = "pytree" if (child / ITEM_METADATA_FILE).exists() else "json"
  return items


def step_tag(metadata: Mapping[str, Any]) -> str | None:
  """The tag given to `save(..., tag=)`, from the step metadata."""
  tag = _kckpt_entry(metadata).get("tag")
  return tag if isinstance(tag, str) else None


def _kckpt_entry(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
  # Metadata is parsed JSON: `dict` checks here (an ABC check costs several times more, per step of a listing).
  custom = metadata.get("custom_metadata") or {}
  own = custom.get(KCKPT_METADATA_KEY) if isinstance(custom, dict) else None
  return own if isinstance(own, dict) else {}


def custom_metadata(
  *,
  time: float,
  tag: str | None,
  metrics: Mapping[str, Any] | None,
  escaped_items: Sequence[str] = (),
  checksums: str | None = None,
  provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """kckpt's entry in the step's custom metadata.

  The step's time (`time.time()` at `save`), its tag, a copy of its metrics
  (also in Orbax's ``metrics`` item: the copy saves a listing one read per
  step; None is recorded too, as "no metrics"), the items saved with
  their dict keys escaped (`kckpt.trees.escape_dotted_keys`), how its array
  data is checksummed (`CRC32C_SHARDS`; absent: not) and what made it.
  """
  own: dict[str, Any] = {"time": time}
  if tag is not None:
    own["tag"] = tag
  own["metrics"] = None if metrics is None else dict(metrics)
  if escaped_items:
    own["escaped_items"] = sorted(escaped_items)
  if checksums is not None:
    own["checksums"] = checksums
  if provenance is not None:
    own["provenance"] = dict(provenance)
  return {KCKPT_METADATA_KEY: own}


def read_step_health(path: EPath) -> dict[str, Any] | None:
  """The step's health record (`HEALTH_FILE`), or None: saved without one (other code, older kckpt)."""
  try:
    value = _read_json(path, HEALTH_FILE)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    log.warning("Step health %s is not valid JSON (%s): the step's health is unknown.", path / HEALTH_FILE, e)
    return None
  return value if isinstance(value, dict) else None


def read_leaf_stats(path: EPath) -> dict[str, dict[str, dict[str, Any]]]:
  """item -> parameter name -> statistics of the step's floating leaves; {} when none were recorded."""
  try:
    value = _read_json(path, LEAF_STATS_FILE)
  except (FileNotFoundError, NotADirectoryError):
    return {}
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    log.warning("Leaf statistics %s are not valid JSON (%s).", path / LEAF_STATS_FILE, e)
    return {}
  return value if isinstance(value, dict) else {}


def read_step_checksums(path: EPath) -> dict[str, dict[str, dict[str, Any]]] | None:
  """item -> parameter name -> dtype, shape and shards of a step saved with `CRC32C_SHARDS`; None when the file is absent."""
  try:
    value = _read_json(path, CHECKSUMS_FILE)
  except (FileNotFoundError, NotADirectoryError):
    return None
  return value if isinstance(value, dict) else None


def step_checksums(metadata: Mapping[str, Any]) -> str | None:
  """How the step's array data is checksummed (`CRC32C_SHARDS`, or `CRC32C_CODEC` in older steps), or None: not."""
  value = _kckpt_entry(metadata).get("checksums")
  return value if isinstance(value, str) else None


def step_provenance(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """What made the step (versions, processes, devices, host, code), as recorded at save; {} when not recorded."""
  value = _kckpt_entry(metadata).get("provenance")
  return dict(value) if isinstance(value, dict) else {}


def escaped_items(metadata: Mapping[str, Any]) -> frozenset[str]:
  """The items of the step whose dict keys were saved escaped."""
  names = _kckpt_entry(metadata).get("escaped_items")
  return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) else frozenset()


def is_step_folder(path: EPath) -> bool:
  """Whether `path` looks like one step folder (named ``ckpt_<n>``, with metadata or items)."""
  if _layout.parse_step(path.name) is None:
    return False
  return (path / STEP_METADATA_FILE).exists() or any(child.is_dir() for child in path.iterdir())


def remove_step_folder(checkpoints: EPath, step: Step) -> bool:
  """Deletes one finished step folder so that no reader ever sees half of it.

  On a local or POSIX file system the folder is first renamed to
  ``ckpt_<step>.orbax-checkpoint-tmp-deleting`` (atomic: listings stop
  reporting the step at once; a leftover after a crash is an unfinished folder
  that Orbax cleans up), then removed. On object stores, where a rename is a
  copy, the commit marker goes first, then the files.

  Returns:
    False when the step was not there (deleted meanwhile by someone else).
  """
  path = _layout.step_dir(checkpoints, step)
  if needs_commit_marker(path):
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
