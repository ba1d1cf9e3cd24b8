"""Small inline SVG plots of a value over steps (a metric, a leaf's norm), for notebooks; no plotting library."""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence

from kckpt import _layout
from kckpt import _orbax
from kckpt import _run
from kckpt._types import EPath, Step
from kckpt.inspect._common import flatten_metrics


@dataclasses.dataclass(frozen=True)
class Plot:
  """A value over steps, shown in a notebook as a small SVG line (`_repr_html_`).

  Attributes:
    title: what is plotted (``"eval.loss"``, ``"params/dense.w norm"``).
    points: ``(step, value)``, by step; NaN and infinite values are left out of the line.
  """

  title: str
  points: tuple[tuple[Step, float], ...]

  def svg(self, width: int = 220, height: int = 60) -> str:
    """The plot as an ``<svg>`` element (a polyline, the first and last values, and the step range).

    >>> "<polyline" in Plot("loss", ((1, 2.0), (2, 1.0), (3, 0.5))).svg()
    True
    """
    finite = [(s, v) for s, v in self.points if isinstance(v, (int, float)) and math.isfinite(v)]
    title = html.escape(self.title)
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="kckpt-plot">'
    label = f'<text x="2" y="11" font-size="10" font-family="monospace">{title}</text>'
    if not finite:
      return f'{head}{label}<text x="2" y="30" font-size="10">no finite values</text></svg>'
    steps = [s for s, _ in finite]
    values = [v for _, v in finite]
    s0, s1, v0, v1 = min(steps), max(steps), min(values), max(values)
    top, bottom, left, right = 16, height - 12, 2, width - 2

    def x(step: Step) -> float:
      return left + (right - left) * ((step - s0) / (s1 - s0) if s1 > s0 else 0.5)

    def y(value: float) -> float:
      return bottom - (bottom - top) * ((value - v0) / (v1 - v0) if v1 > v0 else 0.5)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in finite)
    dots = "".join(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="1.5"/>' for s, v in finite[-1:])
    footer = (
      f'<text x="2" y="{height - 1}" font-size="9" font-family="monospace">'
      f"{html.escape(f'step {s0}..{s1}: {values[0]:.4g} -> {values[-1]:.4g}')}</text>"
    )
    return f'{head}{label}<polyline fill="none" stroke="currentColor" stroke-width="1.2" points="{line}"/>{dots}{footer}</svg>'

  def _repr_html_(self) -> str:
    return self.svg()


def metric_history(checkpoints: EPath, name: str, steps: Sequence[Step] | None = None) -> Plot:
  """The metric `name` (a dotted path, ``"eval.loss"``) over the run's steps (or `steps`), from their metrics files.

  >>> import tempfile, numpy as np, kckpt
  >>> with kckpt.Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=1) as ckpt:
  ...   for s in (1, 2):
  ...     _ = ckpt.save({"w": np.ones(2)}, step=s, metrics={"loss": 1.0 / s})
  >>> metric_history(ckpt.directory, "loss").points
  ((1, 1.0), (2, 0.5))
  """
  chosen = _run.list_steps(checkpoints).finished if steps is None else steps
  points = []
  for step in chosen:
    value = flatten_metrics(_orbax.read_step_metrics(_layout.step_dir(checkpoints, step))).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      points.append((step, float(value)))
  return Plot(name, tuple(points))


def leaf_history(
  checkpoints: EPath, leaf: str, *, item: str = _layout.DEFAULT_ITEM, stat: str = "norm", steps: Sequence[Step] | None = None
) -> Plot:
  """A statistic recorded at save (``norm``, ``min``, ``max``, ``mean``, ``nonfinite``) of one leaf over the steps.

  `leaf` is the leaf's dotted path (as ``kckpt tree`` shows it). Reads one
  small statistics file per step; no array.

  >>> import tempfile, numpy as np, kckpt
  >>> with kckpt.Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=1) as ckpt:
  ...   for s in (1, 2):
  ...     _ = ckpt.save({"w": np.full(4, float(s))}, step=s)
  >>> leaf_history(ckpt.directory, "w").points
  ((1, 2.0), (2, 4.0))
  """
  chosen = _run.list_steps(checkpoints).finished if steps is None else steps
  points = []
  for step in chosen:
    stats = _orbax.read_leaf_stats(_layout.step_dir(checkpoints, step)).get(item, {}).get(leaf)
    if stats is not None and stat in stats:
      points.append((step, float(stats[stat])))
  return Plot(f"{item}/{leaf} {stat}", tuple(points))
