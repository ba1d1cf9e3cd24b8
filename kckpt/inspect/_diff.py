"""Comparing two steps leaf by leaf, a batch at a time."""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kckpt import _layout
from kckpt import _orbax
from kckpt._types import EPath
from kckpt.errors import CheckpointReadError
from kckpt.inspect._common import (
  ProgressFn,
  leaf_batches,
  leaf_label,
  open_reader,
  read_json_item,
  short_error,
  spec_str,
  user_items,
)

if TYPE_CHECKING:
  import numpy as np


@dataclasses.dataclass(frozen=True)
class LeafDiff:
  """How one leaf differs between A and B (values, shape or dtype).

  Attributes:
    leaf: the leaf's label (``params/dense.w``, see `leaf_label`).
    a: its shape and dtype in A (``"(4, 4) float32"``).
    b: the same in B.
    max_abs_diff: max |A-B| (None when not comparable: shapes differ, strings, JSON).
    max_rel_diff: max |A-B| / max |A|.
  """

  leaf: str
  a: str
  b: str
  max_abs_diff: float | None = None
  max_rel_diff: float | None = None

  @property
  def spec_changed(self) -> bool:
    return self.a != self.b

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Diff:
  """The differences between two steps (or two items).

  Shown in a notebook as a table (`_repr_html_`): the changed leaves with
  their largest differences, the leaves on one side only, and what differs in
  how the steps were made.

  Attributes:
    only_in_a: (label, spec) of each leaf or item only in A.
    only_in_b: the same for B.
    changed: the leaves whose values, shape or dtype differ.
    identical: how many leaves are equal.
    a: what A is (``"/runs/exp1/checkpoints/ckpt_100"``); B's the same in `b`.
    b: what B is.
    provenance: ``(key, A's value, B's value)`` where what made the steps
      differs (`provenance_differences`); not counted in `equal`.
  """

  only_in_a: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  only_in_b: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  changed: list[LeafDiff] = dataclasses.field(default_factory=list)
  identical: int = 0
  a: str = "A"
  b: str = "B"
  provenance: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)

  @property
  def equal(self) -> bool:
    return not (self.only_in_a or self.only_in_b or self.changed)

  def as_dict(self) -> dict[str, Any]:
    return {
      "only_in_a": [{"leaf": label, "spec": spec} for label, spec in self.only_in_a],
      "only_in_b": [{"leaf": label, "spec": spec} for label, spec in self.only_in_b],
      "changed": [d.as_dict() for d in self.changed],
      "identical": self.identical,
      "equal": self.equal,
    }

  def summary(self) -> str:
    """``"2 changed, 1 only in A, 0 only in B, 12 identical"``."""
    return (
      f"{len(self.changed)} changed, {len(self.only_in_a)} only in A, {len(self.only_in_b)} only in B, {self.identical} identical"
    )

  def _repr_html_(self) -> str:
    esc = html.escape
    rows = [
      f'<tr class="kckpt-changed"><td><code>{esc(d.leaf)}</code></td><td>changed</td><td>{esc(d.a)}</td><td>{esc(d.b)}</td>'
      f'<td class="kckpt-num">{_fmt(d.max_abs_diff)}</td><td class="kckpt-num">{_fmt(d.max_rel_diff)}</td></tr>'
      for d in sorted(self.changed, key=_severity)
    ]
    rows += [
      f'<tr class="kckpt-only-a"><td><code>{esc(label)}</code></td><td>only in A</td><td>{esc(spec)}</td>'
      + "<td></td>" * 3
      + "</tr>"
      for label, spec in self.only_in_a
    ]
    rows += [
      f'<tr class="kckpt-only-b"><td><code>{esc(label)}</code></td><td>only in B</td><td></td><td>{esc(spec)}</td>'
      + "<td></td>" * 2
      + "</tr>"
      for label, spec in self.only_in_b
    ]
    more = len(rows) - DIFF_ROWS
    rows = rows[:DIFF_ROWS] + ([f'<tr><td colspan="6">... and {more} more (see as_dict())</td></tr>'] if more > 0 else [])
    table = (
      '<table class="kckpt-diff"><thead><tr><th>leaf</th><th>change</th><th>A</th><th>B</th><th>max |A-B|</th>'
      f"<th>max |A-B| / max |A|</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
      if rows
      else "<div>The arrays are equal.</div>"
    )
    provenance = (
      '<table class="kckpt-provenance"><thead><tr><th>made with</th><th>A</th><th>B</th></tr></thead><tbody>'
      + "".join(
        f"<tr><td>{esc(key)}</td><td>{esc(json.dumps(x, default=str))}</td><td>{esc(json.dumps(y, default=str))}</td></tr>"
        for key, x, y in self.provenance
      )
      + "</tbody></table>"
      if self.provenance
      else ""
    )
    return (
      _STYLE + '<div class="kckpt-diff-view">'
      f"<div>A: <code>{esc(self.a)}</code><br>B: <code>{esc(self.b)}</code></div>"
      f'<div class="kckpt-summary">{esc(self.summary())}</div>{table}{provenance}</div>'
    )


DIFF_ROWS = 500  # rows of the table; the rest are counted

_STYLE = """<style>
.kckpt-diff-view {font-family: system-ui, sans-serif; font-size: 13px}
.kckpt-diff-view table {border-collapse: collapse; margin: 4px 0}
.kckpt-diff-view th, .kckpt-diff-view td {padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left}
.kckpt-diff-view td.kckpt-num {text-align: right; font-variant-numeric: tabular-nums}
.kckpt-diff-view tr.kckpt-only-a td:nth-child(2) {color: #b22222}
.kckpt-diff-view tr.kckpt-only-b td:nth-child(2) {color: #2e8b57}
</style>"""


def _severity(d: LeafDiff) -> float:
  """Sort key, largest relative change first; NaN or not comparable (None) counts as the largest."""
  rel = d.max_rel_diff
  return -math.inf if rel is None or math.isnan(rel) else -rel


def _fmt(value: float | None) -> str:
  return "" if value is None else f"{value:.3g}"


def compare_values(a: Any, b: Any) -> tuple[bool, float | None, float | None]:
  """(changed, max absolute difference, max relative difference) of two leaves.

  The relative difference is ``max |A-B| / max |A|`` (over A's finite values):
  how big the largest change is next to the leaf's scale. NaN in the same
  place on both sides counts as equal. Non-numeric leaves are only equal or
  not (no differences).

  >>> import numpy as np
  >>> compare_values(np.array([1.0, np.nan]), np.array([1.0, np.nan]))
  (False, 0.0, 0.0)
  >>> compare_values("adam", "sgd")
  (True, None, None)
  """
  import numpy as np  # pylint: disable=import-outside-toplevel  # not for listings (kckpt ls imports no NumPy)

  if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
    return a != b, None, None
  x, y = np.asarray(a), np.asarray(b)
  if x.shape != y.shape:
    return True, None, None
  if not (_is_numeric(x.dtype) and _is_numeric(y.dtype)):
    return bool(np.any(x != y)), None, None
  wide = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(y) else np.float64
  x, y = x.astype(wide), y.astype(wide)
  same = (x == y) | (np.isnan(x) & np.isnan(y))
  if same.all():
    return False, 0.0, 0.0
  with np.errstate(invalid="ignore", over="ignore"):
    delta = np.where(same, 0.0, np.abs(x - y))  # NaN where only one side is NaN
  max_abs = float(np.max(delta))
  finite = np.isfinite(x)
  scale = float(np.max(np.abs(x[finite]))) if finite.any() else 0.0
  max_rel = max_abs / scale if scale > 0 else math.inf
  return True, max_abs, max_rel


def _is_numeric(dtype: np.dtype) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel

  # bfloat16 and the other ML dtypes of `ml_dtypes` have kind "V" and cast to float64.
  return dtype.kind in "biufc" or (dtype.kind == "V" and np.can_cast(dtype, np.float64))


class _Counter:
  """Leaves compared so far, out of all: for the progress line of a diff across items."""

  def __init__(self, total: int, progress: ProgressFn | None):
    self.done, self.total, self._progress = 0, total, progress

  def add(self, n: int) -> None:
    self.done += n
    if self._progress:
      self._progress(f"{self.done}/{self.total} leaves")


def diff_item(
  reader_a: _orbax.LeafReader,
  reader_b: _orbax.LeafReader,
  *,
  item: str = _layout.DEFAULT_ITEM,
  progress: ProgressFn | None = None,
) -> Diff:
  """Compares two saved pytree items leaf by leaf (labels as `leaf_label(item, path)`)."""
  return _diff_pytree(reader_a, reader_b, item, _Counter(len(reader_a.leaves), progress))


def _read(reader: _orbax.LeafReader, paths: list[str], item: str) -> dict[str, Any]:
  """`reader.read(paths)`; a damaged step (a missing file, a checksum mismatch) is a `CheckpointReadError` naming it."""
  try:
    return reader.read(paths)
  except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
    if not _orbax.is_read_error(e):
      raise
    step = reader.item_dir.parent
    # The reader's message names the leaf and the folder; 600 characters keep a long folder's shard and CRC32Cs.
    raise CheckpointReadError(f"the step at {step} cannot be read: item {item}: {short_error(e, 600)}", item=item) from e


def _diff_pytree(reader_a: _orbax.LeafReader, reader_b: _orbax.LeafReader, item: str, counter: _Counter) -> Diff:
  label = lambda path: leaf_label(item, path)
  diff = Diff(
    only_in_a=[(label(p), spec_str(leaf)) for p, leaf in reader_a.leaves.items() if p not in reader_b.leaves],
    only_in_b=[(label(p), spec_str(leaf)) for p, leaf in reader_b.leaves.items() if p not in reader_a.leaves],
  )
  identical = 0
  common = [leaf for p, leaf in reader_a.leaves.items() if p in reader_b.leaves]
  for batch in leaf_batches(common):
    paths = [leaf.path for leaf in batch]
    values_a = _read(reader_a, paths, item)
    values_b = _read(reader_b, paths, item)
    for path in paths:
      changed, max_abs, max_rel = compare_values(values_a.pop(path), values_b.pop(path))
      leaf_diff = LeafDiff(label(path), spec_str(reader_a.leaves[path]), spec_str(reader_b.leaves[path]), max_abs, max_rel)
      if changed or leaf_diff.spec_changed:
        diff.changed.append(leaf_diff)
      else:
        identical += 1
    counter.add(len(paths))
  return dataclasses.replace(diff, identical=identical)


def diff_steps(path_a: EPath, path_b: EPath, *, progress: ProgressFn | None = None) -> Diff:
  """Compares the steps at `path_a` and `path_b`: items, then leaves (a batch at a time).

  An item only on one side is labelled ``<default item>`` or ``NAME/<item>``;
  JSON items are compared whole (``NAME/<json>``).
  """
  items_a, items_b = user_items(path_a), user_items(path_b)
  readers = {
    name: (open_reader(path_a / name), open_reader(path_b / name))
    for name in items_a
    if name in items_b and items_a[name] == items_b[name] == "pytree"
  }
  counter = _Counter(sum(len(ra.leaves) for ra, _ in readers.values()), progress)
  total = Diff()
  identical = 0
  for name in sorted(items_a.keys() | items_b.keys()):
    whole = leaf_label(name, "<item>") if name != _layout.DEFAULT_ITEM else "<default item>"
    if name not in items_b:
      total.only_in_a.append((whole, items_a[name]))
    elif name not in items_a:
      total.only_in_b.append((whole, items_b[name]))
    elif items_a[name] != items_b[name]:
      total.changed.append(LeafDiff(whole, items_a[name], items_b[name]))
    elif items_a[name] == "json":
      if read_json_item(path_a, name) != read_json_item(path_b, name):
        total.changed.append(LeafDiff(leaf_label(name, "<json>"), "json", "json"))
      else:
        identical += 1
    else:
      part = _diff_pytree(*readers[name], name, counter)
      total.only_in_a.extend(part.only_in_a)
      total.only_in_b.extend(part.only_in_b)
      total.changed.extend(part.changed)
      identical += part.identical
  return dataclasses.replace(
    total, identical=identical, a=str(path_a), b=str(path_b), provenance=step_provenance_differences(path_a, path_b)
  )


def provenance_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
  """``(key, a's value, b's value)`` for every (dotted) key of two steps' provenance whose values differ.

  >>> provenance_differences({"jax": "0.4", "devices": {"count": 8}}, {"jax": "0.5", "devices": {"count": 8}})
  [('jax', '0.4', '0.5')]
  """
  out: list[tuple[str, Any, Any]] = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      out.extend(provenance_differences(x, y, f"{prefix}{key}."))
    elif x != y:
      out.append((f"{prefix}{key}", x, y))
  return out


def step_provenance_differences(step_a: EPath, step_b: EPath) -> list[tuple[str, Any, Any]]:
  """`provenance_differences` of the steps at two folders (empty when neither recorded any)."""
  read = lambda path: _orbax.step_provenance(_orbax.read_step_metadata(path))
  return provenance_differences(read(step_a), read(step_b))
