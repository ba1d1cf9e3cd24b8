"""Verifying steps: every array read back and checked against its metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from kckpt import _layout
from kckpt import _orbax
from kckpt._types import EPath, Step
from kckpt.inspect._common import ProgressFn, leaf_batches, read_json_item, short_error, spec_str


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing wrong with a saved step.

  >>> print(Problem(step=10, item="params", leaf="dense.w", problem="read shape (3,), metadata says (4,)"))
  step 10, item params, leaf dense.w: read shape (3,), metadata says (4,)
  """

  step: Step
  item: str
  leaf: str
  problem: str

  def __str__(self) -> str:
    return f"step {self.step}, item {self.item}, leaf {self.leaf}: {self.problem}"

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class StepCheck:
  """What `verify_step` found in one step.

  Attributes:
    step: the step.
    items: items checked.
    leaves: leaves read.
    bytes: bytes of the leaves read.
    problems: what is wrong (empty: the step is fine).
    deleted: the step went away while it was checked (by the run's retention): not checked.
    checksums: how its array data is checksummed (``"crc32c-shards"``: every
      shard read was checked against it), or None: saved without checksums,
      so a changed bit inside an array would go unseen.
    unchecked: ``"item/leaf"`` of each array the step's checksums leave out
      (its saved shards did not tile it, or the file was edited): read, but a changed bit in
      it would go unseen. Empty in a step kckpt saved with its defaults.
  """

  step: Step
  items: int = 0
  leaves: int = 0
  bytes: int = 0
  problems: list[Problem] = dataclasses.field(default_factory=list)
  deleted: bool = False
  checksums: str | None = None
  unchecked: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not self.problems

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_leaf_value(leaf: _orbax.SavedLeaf, value: Any, *, check_finite: bool = False) -> str | None:
  """What is wrong with a leaf read from disk next to its metadata, or None.

  >>> import numpy as np
  >>> leaf = _orbax.SavedLeaf("w", "array", (4,), np.dtype("float32"))
  >>> check_leaf_value(leaf, np.zeros(3, np.float32))
  'read shape (3,), metadata says (4,)'
  >>> check_leaf_value(leaf, np.array([0, 1, np.nan, 3], np.float32), check_finite=True)
  '1 of 4 values are NaN or infinite'
  """
  import numpy as np  # pylint: disable=import-outside-toplevel  # not for listings (kckpt ls imports no NumPy)

  if leaf.kind == "array":
    if not isinstance(value, np.ndarray):
      return f"read a {type(value).__name__}, metadata says an array {spec_str(leaf)}"
    if leaf.shape is not None and tuple(value.shape) != leaf.shape:
      return f"read shape {tuple(value.shape)}, metadata says {leaf.shape}"
    if leaf.dtype is not None and value.dtype != leaf.dtype:
      return f"read dtype {value.dtype}, metadata says {leaf.dtype}"
    if check_finite and value.dtype.kind in "fc":
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      if bad:
        return f"{bad} of {value.size} values are NaN or infinite"
  elif leaf.kind == "scalar":
    if not isinstance(value, (int, float, complex, np.generic, np.ndarray)) or np.ndim(value) != 0:
      return f"read {type(value).__name__}, metadata says a scalar"
    if check_finite and isinstance(value, (float, np.floating)) and not math.isfinite(value):
      return f"the value is {value}"
  elif leaf.kind == "string" and not isinstance(value, str):
    return f"read {type(value).__name__}, metadata says a string"
  return None


def verify_pytree_item(
  step: Step, name: str, item_dir: EPath, *, check_finite: bool = False, progress: ProgressFn | None = None
) -> tuple[list[Problem], int, int]:
  """Reads every leaf of one item, a batch at a time; (problems, leaves read, bytes read)."""
  problems, leaves_read, bytes_read, _ = _verify_item(step, name, item_dir, check_finite=check_finite, progress=progress)
  return problems, leaves_read, bytes_read


def _verify_item(
  step: Step, name: str, item_dir: EPath, *, check_finite: bool, progress: ProgressFn | None
) -> tuple[list[Problem], int, int, list[str]]:
  """`verify_pytree_item`, and the paths of the item's array leaves (from its metadata)."""
  try:
    reader = _orbax.LeafReader(item_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
    if not _orbax.is_read_error(e):
      raise
    return [Problem(step, name, "<metadata>", f"unreadable: {short_error(e)}")], 0, 0, []
  problems: list[Problem] = []
  leaves_read = bytes_read = 0
  total = len(reader.leaves)
  for batch in leaf_batches(list(reader.leaves.values())):
    values, faults = _orbax.read_each(reader.read, [leaf.path for leaf in batch])
    problems.extend(Problem(step, name, path, f"unreadable: {short_error(e)}") for path, e in faults.items())
    for leaf in batch:
      if leaf.path not in values:
        continue
      fault = check_leaf_value(leaf, values.pop(leaf.path), check_finite=check_finite)
      if fault:
        problems.append(Problem(step, name, leaf.path, fault))
      leaves_read += 1
      bytes_read += leaf.nbytes or 0
    if progress:
      progress(f"{name}: {leaves_read}/{total} leaves")
  return problems, leaves_read, bytes_read, [leaf.path for leaf in reader.leaves.values() if leaf.kind == "array"]


def verify_step(checkpoints: EPath, step: Step, *, check_finite: bool = False, progress: ProgressFn | None = None) -> StepCheck:
  """Checks one step of the run at `checkpoints`: its metadata, every item, every leaf.

  Every leaf is read: in a step saved with checksums (kckpt's default) each
  saved shard is checked against its CRC32C as it is read, so a changed bit is a
  problem naming the leaf. In a step saved without (plain Orbax, older kckpt)
  a flipped bit inside an array goes unseen; a truncated, missing or
  undecodable file does not.
  """
  step_path = _layout.step_dir(checkpoints, step)
  report = StepCheck(step)
  metadata_file = step_path / _orbax.STEP_METADATA_FILE
  try:
    if metadata_file.exists():
      report.checksums = _orbax.step_checksums(json.loads(metadata_file.read_text()))
  except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
    report.problems.append(Problem(step, "-", "-", f"{_orbax.STEP_METADATA_FILE} unreadable: {short_error(e)}"))
  try:
    formats = _orbax.item_formats(step_path)
  except (FileNotFoundError, NotADirectoryError):
    report.deleted = True
    return report
  recorded: dict[str, Any] | None = None  # the step's checksum table, item -> leaf -> ..., read once
  for name, fmt in formats.items():
    item_dir = step_path / name
    if not item_dir.exists():
      if not step_path.exists():
        report.deleted = True
        return report
      report.problems.append(Problem(step, name, "-", "the item's folder is missing"))
      continue
    report.items += 1
    if fmt == "json":
      try:
        if name == _orbax.METRICS_ITEM:
          _orbax.read_step_metrics(step_path)
        else:
          read_json_item(step_path, name)
      except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
        if not _orbax.is_read_error(e):
          raise
        report.problems.append(Problem(step, name, "<json>", f"unreadable: {short_error(e)}"))
      continue
    problems, leaves, nbytes, arrays = _verify_item(step, name, item_dir, check_finite=check_finite, progress=progress)
    report.problems.extend(problems)
    report.leaves += leaves
    report.bytes += nbytes
    if report.checksums == _orbax.CRC32C_SHARDS:
      if recorded is None:
        recorded = _recorded_leaves(step_path)
      report.unchecked.extend(f"{name}/{path}" for path in arrays if path not in recorded.get(name, {}))
  if report.problems and not step_path.exists():  # removed by the run's retention while we read it
    report.deleted, report.problems = True, []
  return report


def _recorded_leaves(step_path: EPath) -> dict[str, Any]:
  """The step's checksum table (item -> leaf -> its shards); empty when unreadable (its reads failed already)."""
  try:
    table = _orbax.read_step_checksums(step_path)
  except (OSError, ValueError):  # ValueError: not JSON
    return {}
  return {item: leaves for item, leaves in (table or {}).items() if isinstance(leaves, dict)}
