"""Per-step rows of a listing, and the saved tree of a step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kckpt import _orbax
from kckpt import _run
from kckpt import policies
from kckpt._types import EPath, Step
from kckpt.inspect._common import ProgressFn, disk_bytes, flatten_metrics, open_reader


def read_details(checkpoints: EPath, steps: Sequence[Step]) -> list[_run.StepDetails]:
  """Time, metrics, items and tag of each step (small files only); steps deleted meanwhile are left out."""
  details = []
  for step in steps:
    try:
      details.append(_run.read_step_details(checkpoints, step))
    except (FileNotFoundError, NotADirectoryError):
      continue
  return details


@dataclasses.dataclass(frozen=True)
class StepRow:
  """One finished step, as a listing shows it.

  Attributes:
    details: its time, metrics, items and tag.
    size_bytes: its size on disk (None when not asked for or unreadable): as
      recorded when it was committed (kckpt's steps, a few hundred bytes of
      metadata aside), else by walking its folder.
    decision: whether the retention policy keeps it and why (None without a policy).
  """

  details: _run.StepDetails
  size_bytes: int | None = None
  decision: policies.KeepDecision | None = None

  @property
  def step(self) -> Step:
    return self.details.step

  @property
  def metrics(self) -> dict[str, Any]:
    """The step's metrics, flattened (`flatten_metrics`)."""
    return flatten_metrics(self.details.metrics)

  @property
  def health(self) -> str:
    """``"ok"``, what made the step unhealthy (``"nan/inf in 2 leaves"``, ``"health_fn"``), or ``"-"``: no record."""
    health = self.details.health
    if health is None:
      return "-"
    if health.get("healthy") is not False:
      return "ok"
    why = []
    if health.get("nonfinite_leaf_count"):
      count = health["nonfinite_leaf_count"]
      why.append(f"nan/inf in {count} lea{'f' if count == 1 else 'ves'}")
    if health.get("health_fn") is False:
      why.append("health_fn")
    return ", ".join(why) or "unhealthy"

  def as_dict(self) -> dict[str, Any]:
    """Plain JSON data (the time in ISO 8601)."""
    row = {
      "step": self.step,
      "time": self.details.time.isoformat() if self.details.time else None,
      "size_bytes": self.size_bytes,
      "items": list(self.details.user_items),
      "metrics": self.metrics,
      "tag": self.details.tag,
      "healthy": self.details.healthy,
      "health": dict(self.details.health) if self.details.health is not None else None,
      "checksums": self.details.checksums,
      "provenance": dict(self.details.provenance),
    }
    if self.decision is not None:
      row.update(keep=self.decision.keep, kept_by=list(self.decision.reasons))
    return row


def summary_rows(
  checkpoints: EPath,
  steps: Sequence[Step] | None = None,
  *,
  retention: policies.RetentionPolicy | None = None,
  sizes: bool = True,
  progress: ProgressFn | None = None,
  listing: _run.StepListing | None = None,
) -> list[StepRow]:
  """One row per finished step of the run at `checkpoints` (or per step of `steps` that is finished).

  Reads the small files of each step, never an array. With `retention`, each
  row says whether that policy keeps the step, decided over every finished
  step of the run. `sizes` walks each shown step's folder for its size.
  Steps deleted meanwhile are left out. `listing`: a listing of `checkpoints`
  the caller just made (not listed again).

  >>> import tempfile, numpy as np, kckpt
  >>> run = tempfile.mkdtemp()
  >>> with kckpt.Checkpointer(workdir=run, save_interval_steps=1, max_to_keep=1, async_save=False) as ckpt:
  ...   for s in (1, 2):
  ...     _ = ckpt.save({"w": np.ones(4)}, step=s, metrics={"loss": 1.0 / s})
  >>> [(row.step, row.metrics) for row in summary_rows(ckpt.directory, sizes=False)]
  [(2, {'loss': 0.5})]
  """
  finished = (_run.list_steps(checkpoints) if listing is None else listing).finished
  known = frozenset(finished)
  shown = list(finished) if steps is None else [s for s in steps if s in known]
  details = {d.step: d for d in read_details(checkpoints, finished if retention is not None else shown)}
  decisions: dict[Step, policies.KeepDecision] = {}
  if retention is not None:
    decisions = {d.step: d for d in policies.decide_retention(retention, [d.record for d in details.values()])}
  rows = []
  for i, step in enumerate(shown, start=1):
    if step not in details:
      continue
    size = None
    if sizes:
      if progress:
        progress(f"size of step {step} ({i}/{len(shown)})")
      recorded = (details[step].health or {}).get("disk_bytes")
      size = recorded if isinstance(recorded, int) else disk_bytes(details[step].path)
    rows.append(StepRow(details[step], size_bytes=size, decision=decisions.get(step)))
  return rows


@dataclasses.dataclass(frozen=True)
class ItemTree:
  """What one item of a step holds, from its metadata alone.

  Attributes:
    item: the item's name.
    format: ``"pytree"`` or ``"json"``.
    disk_bytes: the size of its folder on disk (None when unreadable).
    leaves: its saved leaves, in the tree's order (empty for a JSON item).
  """

  item: str
  format: str
  disk_bytes: int | None
  leaves: tuple[_orbax.SavedLeaf, ...] = ()

  @property
  def nbytes(self) -> int:
    """Bytes of its leaves in memory."""
    return sum(leaf.nbytes or 0 for leaf in self.leaves)

  def as_dict(self) -> dict[str, Any]:
    entry: dict[str, Any] = {"item": self.item, "format": self.format, "disk_bytes": self.disk_bytes}
    if self.format == "pytree":
      entry["leaves"] = [
        {
          "path": leaf.path,
          "kind": leaf.kind,
          "shape": list(leaf.shape) if leaf.shape is not None else None,
          "dtype": str(leaf.dtype) if leaf.dtype is not None else None,
          "bytes": leaf.nbytes,
        }
        for leaf in self.leaves
      ]
      entry["bytes"] = self.nbytes
    return entry


def item_tree(step_path: EPath, item: str, fmt: str) -> ItemTree:
  """The saved leaves of `item` (of format `fmt`, see `user_items`) of the step at `step_path`; no array read."""
  item_dir = step_path / item
  leaves = tuple(open_reader(item_dir).leaves.values()) if fmt == "pytree" else ()
  return ItemTree(item=item, format=fmt, disk_bytes=disk_bytes(item_dir), leaves=leaves)
