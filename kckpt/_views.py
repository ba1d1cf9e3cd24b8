"""How a run looks in a terminal and a notebook: `Checkpointer.summary()` and `_repr_html_`.

Built from one listing and the small files of the newest steps; no array is read.
"""

from __future__ import annotations

import dataclasses
import html

from kckpt import _layout
from kckpt import _run
from kckpt import inspect as inspect_lib


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """A run's steps and the details of the newest ones (newest first)."""

  directory: str
  listing: _run.StepListing
  newest: tuple[_run.StepDetails, ...]

  def as_text(self) -> str:
    finished = self.listing.finished
    lines = [f"{self.directory}: {len(finished)} step(s) {_layout.steps_repr(finished)}"]
    if self.listing.unfinished:
      lines.append(f"  being written (or left by a crash): {', '.join(self.listing.unfinished)}")
    for d in self.newest:
      metrics = _metrics_text(d)
      tag = f"  tag: {d.tag}" if d.tag else ""
      lines.append(
        f"  step {d.step:>8}  {inspect_lib.format_time(d.time)}  items: {', '.join(d.user_items)}{tag}"
        + (f"  {metrics}" if metrics else "")
      )
    return "\n".join(lines)

  def as_html(self) -> str:
    finished = self.listing.finished
    rows = "".join(
      f"<tr><td>{d.step}</td><td>{html.escape(inspect_lib.format_time(d.time))}</td>"
      f"<td>{html.escape(', '.join(d.user_items))}</td><td>{html.escape(_metrics_text(d))}</td></tr>"
      for d in self.newest
    )
    return (
      f"<div><b>kckpt.Checkpointer</b> <code>{html.escape(self.directory)}</code><br>"
      f"{len(finished)} step(s): {html.escape(_layout.steps_repr(finished))}"
      + (f"; being written: {html.escape(', '.join(self.listing.unfinished))}" if self.listing.unfinished else "")
      + "<table><tr><th>step</th><th>saved</th><th>items</th><th>metrics</th></tr>"
      + rows
      + "</table></div>"
    )


def _metrics_text(details: _run.StepDetails) -> str:
  flat = inspect_lib.flatten_metrics(details.metrics)
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


def run_summary(index: _run.RunIndex, *, max_rows: int) -> RunSummary:
  """One fresh listing and the details of the newest `max_rows` steps (those deleted meanwhile are left out)."""
  listing = index.listing(fresh=True)
  newest = inspect_lib.read_details(index.checkpoints, listing.finished[-max_rows:][::-1])
  return RunSummary(directory=str(index.checkpoints), listing=listing, newest=tuple(newest))
