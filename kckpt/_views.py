"""How a run looks in a terminal and a notebook: `Checkpointer.summary()` and `_repr_html_`.

Built from one listing, the small files of the newest steps, what the
retention rules need of every step (as `Checkpointer.retention` reads it, and
cached with it: metrics only when a rule ranks by one, times only with a time
interval) and the metrics of at most `PLOT_POINTS` steps spread over the run
for the plots. No array is read. Without a best metric a run of 10,000 steps
reads the small files of at most 410; with one, each step's metadata once
(one file), then only new steps. On object stores the reads go 16 at a time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import html
from typing import Any

from kckpt import _fs
from kckpt import _layout
from kckpt import _orbax
from kckpt import _run
from kckpt import inspect as inspect_lib
from kckpt import policies
from kckpt._types import Step

PLOT_POINTS = 400  # steps read for the metric plots, spread evenly over the run (newest and best always in)

_STYLE = """<style>
.kckpt-run {font-family: system-ui, sans-serif; font-size: 13px}
.kckpt-run table {border-collapse: collapse; margin: 4px 0}
.kckpt-run th, .kckpt-run td {padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left}
.kckpt-run td.kckpt-num {text-align: right; font-variant-numeric: tabular-nums}
.kckpt-run .kckpt-best {color: #b8860b; font-weight: bold}
.kckpt-run tr.kckpt-best-row {background: rgba(255, 215, 0, 0.15)}
.kckpt-run .kckpt-unhealthy {color: #b22222; font-weight: bold}
.kckpt-run .kckpt-gone {color: #888}
.kckpt-run .kckpt-plots svg {margin-right: 12px}
</style>"""


@dataclasses.dataclass(frozen=True)
class RunSummary:
  """A run's steps, the newest ones in full (newest first), and its metrics over the run.

  Attributes:
    directory: the run's checkpoints folder.
    listing: its finished and unfinished step folders.
    rows: the newest steps, newest first, each with its size and why retention keeps it.
    policy: the retention rules the rows were judged by.
    best: the best step by the policy's metric (None without one or when no step is scored).
    history: metric name -> ``(step, value)`` over at most `PLOT_POINTS` steps, by step.
    best_row: the best step's row when it is older than the rows shown.
    rules_source: where the retention rules come from, in words.
  """

  directory: str
  listing: _run.StepListing
  rows: tuple[inspect_lib.StepRow, ...]
  policy: policies.RetentionPolicy
  best: Step | None = None
  history: dict[str, tuple[tuple[Step, float], ...]] = dataclasses.field(default_factory=dict)
  best_row: inspect_lib.StepRow | None = None
  rules_source: str = ""

  @property
  def newest(self) -> tuple[_run.StepDetails, ...]:
    return tuple(r.details for r in self.rows)

  def as_text(self) -> str:
    finished = self.listing.finished
    lines = [f"{self.directory}: {len(finished)} step(s) {_layout.steps_repr(finished)}"]
    if self.listing.unfinished:
      lines.append(f"  being written (or left by a crash): {', '.join(self.listing.unfinished)}")
    for r in self.rows:
      d = r.details
      metrics = _metrics_text(d)
      tag = f"  tag: {d.tag}" if d.tag else ""
      health = "" if d.healthy else "  UNHEALTHY"
      best = "  (best)" if d.step == self.best and self.policy.best_metric_path else ""
      lines.append(
        f"  step {d.step:>8}  {inspect_lib.format_time(d.time)}  items: {', '.join(d.user_items)}{tag}"
        + (f"  {metrics}" if metrics else "")
        + health
        + best
      )
    if len(self.rows) < len(finished):
      lines.append(f"  ... {len(finished) - len(self.rows)} older step(s) not shown")
    if self.best_row is not None:
      lines.append(f"  best: step {self.best_row.step}  {_metrics_text(self.best_row.details)}")
    return "\n".join(lines)

  def as_html(self) -> str:
    finished = self.listing.finished
    best_metric = self.policy.best_metric_path
    names = sorted({k for r in self.rows for k in r.metrics} | set(self.history))
    tags = any(r.details.tag for r in self.rows)
    header = (
      "<tr><th>step</th><th>saved</th><th>size</th><th>items</th>"
      + "".join(_metric_header(n, best_metric, self.policy.best_mode) for n in names)
      + ("<th>tag</th>" if tags else "")
      + "<th>health</th><th>kept by</th></tr>"
    )
    body = "".join(self._row_html(r, names, tags) for r in self.rows)
    if self.best_row is not None:  # older than the rows shown: after a gap
      body += f'<tr class="kckpt-gap"><td colspan="{len(names) + 6 + tags}">&#8942;</td></tr>'
      body += self._row_html(self.best_row, names, tags)
    if not finished:
      body = f'<tr><td colspan="{len(names) + 6 + tags}">no finished step yet</td></tr>'
    shown = len(self.rows)
    summary = f"{len(finished)} step{'s' if len(finished) != 1 else ''}"
    if finished:
      summary += f" ({finished[0]}..{finished[-1]})"
    sizes = [r.size_bytes for r in self.rows if r.size_bytes is not None]
    if sizes:
      summary += f", newest {inspect_lib.human_bytes(sizes[0])}"
    summary += f"; retention: {html.escape(policies.describe(self.policy))}"
    if self.rules_source:
      summary += f" ({html.escape(self.rules_source)})"
    if best_metric and self.best is not None:
      summary += f"; best step {self.best} by {html.escape(best_metric)} ({self.policy.best_mode})"
    more = (
      f'<div class="kckpt-more">{len(finished) - shown} older step(s) not shown; the plots cover all</div>'
      if shown < len(finished)
      else ""
    )
    unfinished = (
      f'<div class="kckpt-unfinished">being written (or left by a crash): {html.escape(", ".join(self.listing.unfinished))}</div>'
      if self.listing.unfinished
      else ""
    )
    plots = "".join(
      inspect_lib.Plot(f"{n} *" if n == best_metric else n, points).svg() for n, points in self.history.items() if points
    )
    return (
      f'{_STYLE}<div class="kckpt-run"><div><b>kckpt.Checkpointer</b> <code>{html.escape(self.directory)}</code></div>'
      f'<div class="kckpt-summary">{summary}</div>{unfinished}'
      f'<table class="kckpt-steps"><thead>{header}</thead><tbody>{body}</tbody></table>{more}'
      + (f'<div class="kckpt-plots">{plots}</div>' if plots else "")
      + "</div>"
    )

  def _row_html(self, row: inspect_lib.StepRow, names: list[str], tags: bool) -> str:
    d = row.details
    is_best = self.policy.ranks_by_metric and d.step == self.best
    metrics = row.metrics
    star = '<span class="kckpt-best" title="best step">&#9733;</span> ' if is_best and self.policy.best_fn else ""
    cells = [
      f'<td class="kckpt-num">{star}{d.step}</td>' if star else _cell(d.step, num=True),
      _cell(inspect_lib.format_time(d.time)),
      _cell(inspect_lib.human_bytes(row.size_bytes), num=True),
      _cell(", ".join(d.user_items) or "-"),
    ]
    for n in names:
      value = _number(metrics[n]) if n in metrics else ""
      mark = '<span class="kckpt-best" title="best step">&#9733;</span> ' if is_best and n == self.policy.best_metric_path else ""
      cells.append(f'<td class="kckpt-num">{mark}{html.escape(value)}</td>')
    if tags:
      cells.append(_cell(d.tag or ""))
    if d.health is None:
      cells.append(_cell("-", cls="kckpt-health"))
    elif d.healthy:
      cells.append(_cell("ok", cls="kckpt-health"))
    else:
      cells.append(_cell(f"unhealthy: {row.health}", cls="kckpt-health kckpt-unhealthy"))
    reasons = row.decision.reasons if row.decision is not None else ()
    cells.append(_cell(", ".join(reasons)) if reasons else _cell("- (gc would delete)", cls="kckpt-gone"))
    attrs = f' data-step="{d.step}"' + (' class="kckpt-best-row"' if is_best else "")
    return f"<tr{attrs}>{''.join(cells)}</tr>"


def _cell(value: object, *, num: bool = False, cls: str = "") -> str:
  classes = " ".join(c for c in ("kckpt-num" if num else "", cls) if c)
  return f"<td{f' class={chr(34)}{classes}{chr(34)}' if classes else ''}>{html.escape(str(value))}</td>"


def _metric_header(name: str, best_metric: str | None, mode: str) -> str:
  if name != best_metric:
    return f"<th>{html.escape(name)}</th>"
  return f'<th>{html.escape(name)} <span class="kckpt-best" title="retention ranks by it ({mode})">&#9733; {mode}</span></th>'


def _number(value: object) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics_text(details: _run.StepDetails) -> str:
  flat = inspect_lib.flatten_metrics(details.metrics)
  return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


def _spread(steps: tuple[Step, ...], count: int, keep: set[Step]) -> list[Step]:
  """At most `count` of `steps` (sorted), evenly spread, plus those in `keep`; sorted.

  >>> _spread(tuple(range(100)), 5, {42})
  [0, 25, 42, 50, 74, 99]
  """
  if len(steps) <= count:
    return list(steps)
  picked = {steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)}
  return sorted(picked | (keep & set(steps)))


def run_summary(index: _run.RunIndex, *, max_rows: int) -> RunSummary:
  """One fresh listing, the newest `max_rows` steps in full, retention over all, metrics over a spread of steps."""
  listing = index.listing(fresh=True)
  finished = listing.finished
  policy = index.retention
  records = index.records(finished)
  decisions = {d.step: d for d in policies.decide_retention(policy, records, is_healthy=index.healthy)}
  best = policies.best_step(policy, records) if policy.ranks_by_metric else None
  newest = inspect_lib.read_details(index.checkpoints, finished[-max_rows:][::-1])
  rows = tuple(inspect_lib.StepRow(d, size_bytes=_recorded_size(d), decision=decisions.get(d.step)) for d in newest)
  best_row = None
  if best is not None and best not in {d.step for d in newest}:
    older = inspect_lib.read_details(index.checkpoints, [best])
    if older:
      best_row = inspect_lib.StepRow(older[0], size_bytes=_recorded_size(older[0]), decision=decisions.get(best))
  plotted = _spread(finished, PLOT_POINTS, {s for s in (best, finished[-1] if finished else None) if s is not None})
  known = {d.step: d.metrics for d in newest} | ({best_row.step: best_row.details.metrics} if best_row else {})
  metrics = _metrics_of(index, [s for s in plotted if s not in known]) | known
  history: dict[str, list[tuple[Step, float]]] = {}
  for step in plotted:
    for name, value in inspect_lib.flatten_metrics(metrics.get(step)).items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        history.setdefault(name, []).append((step, float(value)))
  return RunSummary(
    directory=str(index.checkpoints),
    listing=listing,
    rows=rows,
    policy=policy,
    best=best,
    history={n: tuple(p) for n, p in sorted(history.items())},
    best_row=best_row,
    rules_source=_rules_source(index.checkpoints, policy),
  )


def _metrics_of(index: _run.RunIndex, steps: list[Step]) -> dict[Step, Any]:
  """step -> its metrics (kckpt's steps: one small file each); 16 at a time on object stores; deleted steps left out."""

  def read(step: Step) -> tuple[Step, Any]:
    path = _layout.step_dir(index.checkpoints, step)
    try:
      return step, _orbax.read_step_metrics(path, _orbax.read_step_metadata(path))
    except (FileNotFoundError, NotADirectoryError):
      return step, None

  if len(steps) > 1 and not _fs.is_local(index.checkpoints):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      return dict(pool.map(read, steps))
  return dict(map(read, steps))


def _rules_source(checkpoints: Any, policy: policies.RetentionPolicy) -> str:
  """Whether `policy` is what the run's writer recorded (what decides what stays on disk)."""
  rules = _layout.read_retention_rules(checkpoints)
  if not isinstance(rules, dict):
    return "the writer recorded none: kckpt's defaults or this Checkpointer's"
  if rules.get("best_fn") and not policy.best_fn:
    return f"the writer ranks by a Python function, {rules['best_fn']}, which cannot be read back"
  mine = {k: v for k, v in policies.retention_rules(policy).items() if k != "best_fn"}
  if all(rules.get(k) == v for k, v in mine.items()):
    return "as the run's writer recorded them"
  return "this Checkpointer's; the run's writer recorded others"


def _recorded_size(details: _run.StepDetails) -> int | None:
  """The step's size as recorded at its commit (kckpt's steps); else its folder is walked."""
  recorded = (details.health or {}).get("disk_bytes")
  if isinstance(recorded, int):
    return recorded
  return inspect_lib.disk_bytes(details.path)


def step_tree(details: _run.StepDetails) -> inspect_lib.TreeView:
  """The `kckpt.inspect.TreeView` of a step (`Checkpointer.tree`)."""
  return inspect_lib.step_tree(details.path, details.step)


def diff(a: _run.StepDetails, b: _run.StepDetails) -> inspect_lib.Diff:
  """Two steps compared leaf by leaf (`Checkpointer.diff`)."""
  return inspect_lib.diff_steps(a.path, b.path)
