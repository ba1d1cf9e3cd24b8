"""When to save and what to keep: pure functions of (step, time, metrics, history).

Nothing here touches the disk or JAX, so every rule is unit- and
property-tested on its own; `kckpt.Checkpointer` feeds them what it reads.

Retention is kckpt's own rather than Orbax's `BestN`/`LatestN` composition:
Orbax's best-N deletes the newest step (Orbax #526) and cannot say *why* a step
stays. `decide_retention` returns, for every step, whether it stays and the
rules that keep it, and the Checkpointer hands those decisions to Orbax as its
preservation policy.

Example:

>>> policy = RetentionPolicy(max_to_keep=2, keep_period=100)
>>> [d.step for d in decide_retention(policy, [StepRecord(s) for s in (100, 150, 200, 250)]) if d.keep]
[100, 200, 250]
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from kckpt._types import Metrics, Step

BestMode = Literal["max", "min"]
BEST_MODES = ("max", "min")
DEFAULT_MAX_TO_KEEP = 3  # `Checkpointer.max_to_keep` and the `kckpt` command use this one default


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def to_json_metrics(metrics: Any, *, path: str = "metrics") -> Any:
  """Converts a nested dict of Python/NumPy/JAX scalars into plain JSON values.

  Raises:
    ValueError: naming the path of a value that is not a number, string,
      bool or None (arrays with more than one element included).
  """
  if isinstance(metrics, Mapping):
    return {str(k): to_json_metrics(v, path=f"{path}.{k}") for k, v in metrics.items()}
  if isinstance(metrics, (list, tuple)):
    return [to_json_metrics(v, path=f"{path}[{i}]") for i, v in enumerate(metrics)]
  if metrics is None or isinstance(metrics, bool):
    return metrics
  if isinstance(metrics, numbers.Integral):
    return int(metrics)
  if isinstance(metrics, numbers.Real):
    return float(metrics)
  if isinstance(metrics, str):
    return str(metrics)
  if hasattr(metrics, "shape") and hasattr(metrics, "dtype"):  # NumPy or JAX array
    if tuple(metrics.shape) not in ((), (1,)):
      raise ValueError(f"{path}: metrics must be scalars, got an array of shape {tuple(metrics.shape)}")
    import numpy as np  # pylint: disable=import-outside-toplevel  # only for array metrics: listings skip NumPy

    value = np.asarray(metrics).reshape(()).item()  # no JAX op: nothing to compile
    return to_json_metrics(value, path=path)
  raise ValueError(f"{path}: metrics must be numbers, got {type(metrics).__name__}: {metrics!r}")


def metric_at_path(metrics: Metrics, path: str) -> Any:
  """``metric_at_path({"eval": {"loss": 1.0}}, "eval.loss") == 1.0``.

  Raises:
    KeyError: naming the first missing part of `path` and the keys that exist.
  """
  value: Any = metrics
  walked: list[str] = []
  for part in path.split("."):
    if not isinstance(value, Mapping) or part not in value:
      where = ".".join(walked) or "<metrics>"
      keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
      raise KeyError(f"best_metric_path {path!r}: {where} has no {part!r} (it has: {keys})")
    value = value[part]
    walked.append(part)
  return value


def as_score(value: Any, *, what: str) -> float:
  """A metric value as a float; NaN is allowed here and ranked by `rank_key`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
  return float(value)


# ---------------------------------------------------------------------------
# When to save
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SavePolicy:
  """When `maybe_save` saves.

  Attributes:
    interval_steps: save when ``step % interval_steps == 0``.
    on_steps: extra steps that are always saved.
    interval_secs: also save when this many seconds passed since the last
      save (or since training started).
    never_save_step_zero: never save step 0, whatever the other rules say.
  """

  interval_steps: int | None = None
  on_steps: frozenset[Step] = frozenset()
  interval_secs: float | None = None
  never_save_step_zero: bool = False


def save_reason(
  policy: SavePolicy,
  step: Step,
  *,
  now: float | None = None,
  last_save_time: float | None = None,
) -> str | None:
  """Why `step` should be saved (``"interval"``, ``"on_steps"``, ``"time"``), or None.

  `now` and `last_save_time` are seconds (any clock, the same for both); the
  time rule is only checked when both are given.

  >>> save_reason(SavePolicy(interval_steps=10), 20)
  'interval'
  >>> save_reason(SavePolicy(interval_steps=10), 21) is None
  True
  """
  if step == 0 and policy.never_save_step_zero:
    return None
  if policy.interval_steps and step % policy.interval_steps == 0:
    return "interval"
  if step in policy.on_steps:
    return "on_steps"
  if policy.interval_secs is not None and now is not None and last_save_time is not None:
    if now - last_save_time >= policy.interval_secs:
      return "time"
  return None


def time_due(policy: SavePolicy, step: Step, *, since_last_save: float) -> bool:
  """Whether the `interval_secs` rule alone asks to save `step`, `since_last_save` seconds after the last save.

  >>> time_due(SavePolicy(interval_steps=100, interval_secs=60), 7, since_last_save=61.0)
  True
  >>> time_due(SavePolicy(interval_steps=100, interval_secs=60), 100, since_last_save=61.0)  # saved by the interval
  False
  """
  return (
    policy.interval_secs is not None
    and save_reason(policy, step) is None
    and not (step == 0 and policy.never_save_step_zero)
    and since_last_save >= policy.interval_secs
  )


# ---------------------------------------------------------------------------
# What to keep
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """What retention knows of one step.

  Attributes:
    step: the step.
    time: when it was saved, in seconds since the epoch (None: unknown).
    metrics: the metrics saved with it (None: saved without metrics).
    healthy: False when the step was marked unhealthy at save (non-finite
      floating values, or the `health_fn` said so); True otherwise, steps
      saved without a health record included.
  """

  step: Step
  time: float | None = None
  metrics: Metrics | None = None
  healthy: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
  """Which steps stay on disk.

  A step stays when any rule keeps it:

  * ``newest``: the newest step always stays, so a run can always resume.
  * ``latest``: without a best metric, the newest `max_to_keep` steps.
  * ``best``: with `best_metric_path` or `best_fn`, the `max_to_keep` best
    scored steps (in addition to the newest). A step saved without metrics,
    or whose score is NaN, is never ranked: it stays only while it is the
    newest or another rule keeps it.
  * ``period``: every step divisible by `keep_period`, forever.
  * ``interval``: one step per `keep_time_interval_secs`, forever (the first
    step, then the first one saved at least that long after the last kept).

  `max_to_keep=None` keeps every step.
  """

  max_to_keep: int | None = DEFAULT_MAX_TO_KEEP
  keep_period: int | None = None
  keep_time_interval_secs: float | None = None
  best_metric_path: str | None = None
  best_fn: Callable[[Metrics], float] | None = None
  best_mode: BestMode = "max"

  def __post_init__(self):
    if self.max_to_keep is not None and (isinstance(self.max_to_keep, bool) or self.max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive int or None, got {self.max_to_keep!r}")
    if self.best_mode not in BEST_MODES:
      raise ValueError(f"best_mode must be one of {BEST_MODES}, got {self.best_mode!r}")

  @property
  def ranks_by_metric(self) -> bool:
    return self.best_metric_path is not None or self.best_fn is not None

  def score(self, metrics: Metrics | None) -> float | None:
    """The step's score, or None when it cannot be ranked (no metrics, NaN)."""
    if metrics is None or not self.ranks_by_metric:
      return None
    try:
      if self.best_fn is not None:
        value = as_score(self.best_fn(metrics), what="best_fn(metrics)")
      else:
        assert self.best_metric_path is not None  # ranks_by_metric
        value = as_score(metric_at_path(metrics, self.best_metric_path), what=f"metric {self.best_metric_path!r}")
    except (KeyError, ValueError, TypeError):
      return None  # Checked at save; a step written by other code just goes unranked.
    return None if math.isnan(value) else value


@dataclasses.dataclass(frozen=True)
class KeepDecision:
  """Whether one step stays, and the rules that keep it.

  Attributes:
    step: the step.
    keep: True when at least one rule keeps it.
    reasons: the rules, e.g. ``("newest", "best #2")``; empty when it goes.
    score: its score under the best-metric rule, if any.
  """

  step: Step
  keep: bool
  reasons: tuple[str, ...] = ()
  score: float | None = None

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def decide_retention(
  policy: RetentionPolicy, records: Iterable[StepRecord], *, is_healthy: Callable[[Step], bool] | None = None
) -> list[KeepDecision]:
  """Decides, for each step, whether it stays and why. Sorted by step.

  Each step appears once (the last record given for a step wins). Besides the
  policy's rules, the newest healthy step always stays (reason ``"last
  good"``, when the newest step is not healthy). `is_healthy(step)` is asked
  newest first until a healthy step is found (default: `StepRecord.healthy`),
  so only the steps newer than the last good one are looked at.

  >>> policy = RetentionPolicy(max_to_keep=2)
  >>> records = [StepRecord(1), StepRecord(2), StepRecord(3, healthy=False), StepRecord(4, healthy=False)]
  >>> [(d.step, d.reasons) for d in decide_retention(policy, records) if d.keep]
  [(2, ('last good',)), (3, ('latest',)), (4, ('newest', 'latest'))]
  """
  records = sorted({r.step: r for r in records}.values(), key=lambda r: r.step)
  reasons: dict[Step, list[str]] = {r.step: [] for r in records}
  if not records:
    return []

  reasons[records[-1].step].append("newest")
  healthy = is_healthy or {r.step: r.healthy for r in records}.__getitem__
  last_good = next((r.step for r in reversed(records) if healthy(r.step)), None)
  if last_good is not None and last_good != records[-1].step:
    reasons[last_good].append("last good")

  scores = {r.step: policy.score(r.metrics) for r in records}
  if policy.ranks_by_metric:
    scored = {s: score for s, score in scores.items() if score is not None}
    sign = -1.0 if policy.best_mode == "max" else 1.0
    # Best first; among equal scores the newer step ranks higher.
    ranked = sorted(scored, key=lambda s: (sign * scored[s], -s))
    limit = len(ranked) if policy.max_to_keep is None else policy.max_to_keep
    for rank, step in enumerate(ranked[:limit], start=1):
      reasons[step].append(f"best #{rank}")
  else:
    latest = records if policy.max_to_keep is None else records[-policy.max_to_keep :]
    for r in latest:
      reasons[r.step].append("latest")

  if policy.keep_period:
    for r in records:
      if r.step % policy.keep_period == 0:
        reasons[r.step].append("period")

  if policy.keep_time_interval_secs:
    last_kept: float | None = None
    for r in records:
      if r.time is None:
        continue
      if last_kept is None or r.time - last_kept >= policy.keep_time_interval_secs:
        reasons[r.step].append("interval")
        last_kept = r.time

  return [
    KeepDecision(step=r.step, keep=bool(reasons[r.step]), reasons=tuple(reasons[r.step]), score=scores[r.step]) for r in records
  ]


def describe(policy: RetentionPolicy) -> str:
  """The rules in one line, as ``kckpt ls`` and the notebook view show them.

  >>> describe(RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode="min"))
  'max_to_keep=2, best_metric=eval.loss (min)'
  """
  parts = [f"max_to_keep={'all' if policy.max_to_keep is None else policy.max_to_keep}"]
  if policy.keep_period:
    parts.append(f"keep_period={policy.keep_period}")
  if policy.keep_time_interval_secs:
    parts.append(f"keep_time_interval={policy.keep_time_interval_secs:g}s")
  if policy.best_metric_path:
    parts.append(f"best_metric={policy.best_metric_path} ({policy.best_mode})")
  return ", ".join(parts)


def retention_rules(policy: RetentionPolicy) -> dict[str, Any]:
  """The policy as plain JSON data (a `best_fn` is recorded by name only)."""
  return {
    "max_to_keep": policy.max_to_keep,
    "keep_period": policy.keep_period,
    "keep_time_interval_secs": policy.keep_time_interval_secs,
    "best_metric_path": policy.best_metric_path,
    "best_fn": getattr(policy.best_fn, "__qualname__", repr(policy.best_fn)) if policy.best_fn else None,
    "best_mode": policy.best_mode,
  }


def policy_from_rules(rules: Mapping[str, Any]) -> RetentionPolicy:
  """The inverse of `retention_rules`; a `best_fn` cannot be rebuilt (ValueError)."""
  if rules.get("best_fn"):
    raise ValueError(f"the run ranks steps with a Python function ({rules['best_fn']}), which cannot be read back")
  return RetentionPolicy(
    max_to_keep=rules.get("max_to_keep"),
    keep_period=rules.get("keep_period"),
    keep_time_interval_secs=rules.get("keep_time_interval_secs"),
    best_metric_path=rules.get("best_metric_path"),
    best_mode=rules.get("best_mode", "max"),
  )


def check_metrics(metrics: Metrics | None, policy: RetentionPolicy, *, what: str) -> Any:
  """`metrics` as JSON data, checked to hold a score when `policy` ranks by one; ValueError starting with `what`.

  >>> import numpy as np
  >>> check_metrics({"eval": {"loss": np.float32(0.5)}}, RetentionPolicy(best_metric_path="eval.loss"), what="save")
  {'eval': {'loss': 0.5}}
  """
  if metrics is None:
    return None
  try:
    json_metrics = to_json_metrics(metrics)
    if not isinstance(json_metrics, Mapping):
      raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    if policy.best_metric_path is not None:
      as_score(metric_at_path(json_metrics, policy.best_metric_path), what=f"metric {policy.best_metric_path!r}")
    elif policy.best_fn is not None:
      as_score(policy.best_fn(json_metrics), what="best_fn(metrics)")
  except KeyError as e:
    raise ValueError(f"{what}: {e.args[0]}") from None
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
  return json_metrics


def best_step(policy: RetentionPolicy, records: Iterable[StepRecord]) -> Step | None:
  """The best scored step (the newer one among equal scores); without a best metric, the newest step.

  >>> records = [StepRecord(step=1, metrics={"loss": 0.5}), StepRecord(step=2, metrics={"loss": 0.9})]
  >>> best_step(RetentionPolicy(best_metric_path="loss", best_mode="min"), records)
  1
  """
  records = sorted({r.step: r for r in records}.values(), key=lambda r: r.step)
  if not policy.ranks_by_metric:
    return records[-1].step if records else None
  scored = [(s, r.step) for r in records if (s := policy.score(r.metrics)) is not None]
  if not scored:
    return None
  sign = 1.0 if policy.best_mode == "max" else -1.0
  return max(scored, key=lambda p: (sign * p[0], p[1]))[1]


def steps_to_delete(policy: RetentionPolicy, records: Sequence[StepRecord]) -> list[Step]:
  return [d.step for d in decide_retention(policy, records) if not d.keep]


def timedelta_seconds(value: datetime.timedelta | float | int | None) -> float | None:
  if value is None:
    return None
  if isinstance(value, datetime.timedelta):
    return value.total_seconds()
  return float(value)
