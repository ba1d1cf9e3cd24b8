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
      health = "" if d.healthy else "  UNHEALTHY"
      lines.append(
        f"  step {d.step:>8}  {inspect_lib.format_time(d.time)}  items: {', '.join(d.user_items)}{tag}"
        + (f"  {metrics}" if metrics else "")
        + health
      )
    return "\n".join(lines)

  def as_html(self) -> str:
    finished = self.listing.finished
    names = sorted({k for d in self.newest for k in inspect_lib.flatten_metrics(d.metrics)})
    tags = any(d.tag for d in self.newest)

    def cell(value: object) -> str:
      return f"<td>{html.escape(str(value))}</td>"

    rows = "".join(
      "<tr>"
      + cell(d.step)
      + cell(inspect_lib.format_time(d.time))
      + cell(", ".join(d.user_items))
      + "".join(cell(_number(inspect_lib.flatten_metrics(d.metrics).get(n, ""))) for n in names)
      + (cell(d.tag or "") if tags else "")
      + cell("-" if d.health is None else "ok" if d.healthy else "unhealthy")
      + "</tr>"
      for d in self.newest
    )
    header = (
      "<tr><th>step</th><th>saved</th><th>items</th>"
      + "".join(f"<th>{html.escape(n)}</th>" for n in names)
      + ("<th>tag</th>" if tags else "")
      + "<th>health</th></tr>"
    )
    oldest_first = [d.step for d in reversed(self.newest)]
    plots = "".join(
      inspect_lib.Plot(
        n,
        tuple(
          (d.step, float(v))
          for d in reversed(self.newest)
          if isinstance(v := inspect_lib.flatten_metrics(d.metrics).get(n), (int, float)) and not isinstance(v, bool)
        ),
      ).svg()
      for n in names
    )
    shown = f"the newest {len(oldest_first)}" if len(oldest_first) < len(finished) else "all"
    return (
      f"<div><b>kckpt.Checkpointer</b> <code>{html.escape(self.directory)}</code><br>"
      f"{len(finished)} step(s): {html.escape(_layout.steps_repr(finished))}"
      + (f"; being written: {html.escape(', '.join(self.listing.unfinished))}" if self.listing.unfinished else "")
      + f"<table>{header}{rows}</table>"
      + (f"<div>metrics over {shown} steps shown:<br>{plots}</div>" if plots else "")
      + "</div>"
    )


def _number(value: object) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_text(details: _run.StepDetails) -> str:
  flat = inspect_lib.flatten_metrics(details.metrics)
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


def run_summary(index: _run.RunIndex, *, max_rows: int) -> RunSummary:
  """One fresh listing and the details of the newest `max_rows` steps (those deleted meanwhile are left out)."""
  listing = index.listing(fresh=True)
  newest = inspect_lib.read_details(index.checkpoints, listing.finished[-max_rows:][::-1])
  return RunSummary(directory=str(index.checkpoints), listing=listing, newest=tuple(newest))
