"""The `kckpt` command: see, compare, check and clean checkpoints from a shell.

::

  kckpt ls RUN                      steps, times, sizes, items, metrics, why each stays
  kckpt tree RUN [--step N]         the saved tree: path, shape, dtype, bytes (metadata only)
  kckpt diff A B                    leaves only in A / only in B, shape and value changes
  kckpt verify RUN [--step N]       read every array; check shapes and dtypes
  kckpt gc RUN --max-to-keep N ...  delete what the retention rules would not keep
  kckpt watch RUN                   print each new finished step as it appears
  kckpt export RUN --items params OUT   a weights-only checkpoint

RUN is a workdir, its ``checkpoints/`` folder, or one ``ckpt_<step>`` folder.
Every command is read-only except ``gc`` (deletes) and ``export`` (writes OUT).
Tables by default, ``--json`` for scripts. Errors are one line on stderr and
exit 2; ``verify`` exits 1 when it finds a problem, ``diff`` when A and B
differ (as ``diff(1)`` does).

Built on `argparse`: the standard library covers sub-commands, help with
examples and typed flags, and adds no dependency to a library that training
jobs install.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from etils import epath

from kckpt import _orbax
from kckpt import checkpointer as checkpointer_lib
from kckpt import errors
from kckpt import items as items_lib
from kckpt import markers
from kckpt import policies
from kckpt import steps as steps_lib
from kckpt import watch
from kckpt._types import Step

PROG = "kckpt"
# Leaves are read in batches of at most this many bytes (a larger leaf alone):
# memory holds one batch (two for `diff`), never a whole tree.
LEAF_BATCH_BYTES = 64 * 2**20
EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
  """A problem the user can fix (bad path, unknown step): printed as one line, exit 2."""


# ---------------------------------------------------------------------------
# Output: sizes, tables, progress
# ---------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
  """``1536 -> '1.5 KiB'``; None -> ``'-'``."""
  if n is None:
    return "-"
  if n < 1024:
    return f"{n} B"
  value = float(n)
  for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
    value /= 1024
    if value < 1024 or unit == "PiB":
      return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
  raise AssertionError("unreachable")


def format_number(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()) -> str:
  """Columns padded to their widest cell; columns in `right` are right-aligned."""
  widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

  def line(cells: Sequence[str]) -> str:
    parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(parts).rstrip()

  return "\n".join([line(headers)] + [line(r) for r in rows])


def format_time(when: datetime.datetime | None) -> str:
  return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else "?"


def iso_time(when: datetime.datetime | None) -> str | None:
  return when.isoformat() if when else None


def flatten_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
  """``{"eval": {"loss": 1}} -> {"eval.loss": 1}``."""
  flat: dict[str, Any] = {}
  for key, value in (metrics or {}).items():
    if isinstance(value, Mapping):
      flat.update(flatten_metrics(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def print_json(value: Any, out: TextIO) -> None:
  """Strict JSON (NaN and infinities become the strings "nan", "inf", "-inf")."""
  json.dump(_jsonable(value), out, indent=2, default=_json_default, allow_nan=False)
  out.write("\n")


def _jsonable(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (epath.Path, os.PathLike)):
    return os.fspath(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Progress:
  """One status line on stderr, rewritten in place; only when stderr is a terminal.

  Piped or redirected output stays clean: nothing is written at all.
  """

  def __init__(self, stream: TextIO | None = None, *, min_interval_secs: float = 0.1):
    self._stream = stream if stream is not None else sys.stderr
    self.enabled = _is_terminal(self._stream)
    self._min_interval = min_interval_secs
    self._last = 0.0
    self._shown = False

  def update(self, text: str, *, force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.monotonic()
    if not force and now - self._last < self._min_interval:
      return
    self._last = now
    self._stream.write("\r\x1b[K" + text)
    self._stream.flush()
    self._shown = True

  def clear(self) -> None:
    if self.enabled and self._shown:
      self._stream.write("\r\x1b[K")
      self._stream.flush()
      self._shown = False


def _is_terminal(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def short_error(error: BaseException, limit: int = 240) -> str:
  """One line for an exception: its type and the start of its message.

  TensorStore errors carry a long JSON spec after the useful part; it is cut.
  """
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------
# Where the checkpoints are: RUN arguments and steps
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLocation:
  """What a RUN argument names.

  Attributes:
    checkpoints: the folder holding the ``ckpt_<step>`` folders.
    step: the step when RUN was one step folder, else None.
    given: RUN as typed.
  """

  checkpoints: epath.Path
  step: Step | None
  given: str

  def listing(self) -> steps_lib.StepListing:
    return steps_lib.list_steps(self.checkpoints)

  def step_path(self, step: Step) -> epath.Path:
    return steps_lib.step_dir(self.checkpoints, step)


def _is_step_folder(path: epath.Path) -> bool:
  if steps_lib.parse_step(path.name) is None:
    return False
  return (path / steps_lib.STEP_METADATA_FILE).exists() or any(child.is_dir() for child in path.iterdir())


def locate(given: str) -> RunLocation:
  """Finds the checkpoints folder (and step) that `given` names; CliError if none."""
  path = epath.Path(given)
  try:
    exists, is_dir = path.exists(), path.is_dir()
  except OSError as e:
    raise CliError(f"cannot read {given}: {short_error(e)}") from None
  if not exists:
    raise CliError(f"no such folder: {given}")
  if not is_dir:
    raise CliError(f"not a folder: {given} (give a workdir, its checkpoints/ folder or a ckpt_<step> folder)")
  if steps_lib.parse_step(path.name) is not None and _is_step_folder(path):
    return RunLocation(checkpoints=path.parent, step=steps_lib.parse_step(path.name), given=given)
  if (path / steps_lib.CHECKPOINTS_FOLDER).is_dir():
    return RunLocation(checkpoints=path / steps_lib.CHECKPOINTS_FOLDER, step=None, given=given)
  names = [child.name for child in path.iterdir()]
  if path.name == steps_lib.CHECKPOINTS_FOLDER or any(n.startswith(f"{steps_lib.STEP_PREFIX}_") for n in names):
    return RunLocation(checkpoints=path, step=None, given=given)
  raise CliError(
      f"{given} is not a kckpt run: it has no {steps_lib.CHECKPOINTS_FOLDER}/ folder and no"
      f" {steps_lib.STEP_PREFIX}_<step> folders"
  )


def locate_run(given: str, command: str) -> RunLocation:
  """Like `locate`, for commands that act on a whole run (not one step folder)."""
  location = locate(given)
  if location.step is not None:
    raise CliError(
        f"{command} works on a whole run, and {given} is one step folder; give its run: {location.checkpoints}"
    )
  return location


def parse_step_arg(text: str) -> Step | str:
  """``"10" -> 10``; ``"latest"`` stays a word."""
  if text == "latest":
    return text
  try:
    step = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"a step is a number or 'latest', got {text!r}") from None
  if step < 0:
    raise argparse.ArgumentTypeError(f"a step is a number >= 0 or 'latest', got {text!r}")
  return step


def resolve_step(location: RunLocation, step: Step | str | None) -> Step:
  """The step that `step` (a number, 'latest' or None) names in `location`; CliError if none."""
  if location.step is not None:
    if step not in (None, "latest", location.step):
      raise CliError(f"{location.given} is step {location.step}, but --step {step} was asked for")
    if not location.step_path(location.step).exists():
      raise CliError(f"step {location.step} is not in {location.checkpoints} any more")
    return location.step
  finished = location.listing().finished
  if not finished:
    raise CliError(f"no finished step in {location.checkpoints}")
  if step in (None, "latest"):
    return finished[-1]
  if step not in finished:
    raise CliError(f"step {step} is not in {location.checkpoints} (steps: {steps_lib.steps_repr(finished)})")
  return step  # type: ignore[return-value]


def steps_to_visit(location: RunLocation, step: Step | str | None) -> list[Step]:
  """One step when asked for (or when RUN is a step folder), else every finished step."""
  if step is not None or location.step is not None:
    return [resolve_step(location, step)]
  finished = list(location.listing().finished)
  if not finished:
    raise CliError(f"no finished step in {location.checkpoints}")
  return finished


def step_items(step_path: epath.Path) -> dict[str, str]:
  """Item name -> ``"pytree"`` or ``"json"`` for the step at `step_path` (user items only)."""
  try:
    handlers = steps_lib.read_item_names(step_path)
  except FileNotFoundError:
    raise CliError(f"step folder {step_path} disappeared (deleted by the run's retention?)") from None
  return {n: _orbax.item_format(h) for n, h in handlers.items() if n not in steps_lib.RESERVED_ITEMS}


def leaf_label(item: str, path: str) -> str:
  """How a leaf is named in output: ``params.w`` in the default item, ``opt/mu.w`` in others."""
  return path if item == steps_lib.DEFAULT_ITEM else f"{item}/{path}"


def leaf_batches(leaves: Sequence[_orbax.SavedLeaf], max_bytes: int | None = None) -> Iterator[list[_orbax.SavedLeaf]]:
  """Consecutive groups of leaves of at most `max_bytes` (default `LEAF_BATCH_BYTES`; a bigger leaf alone)."""
  max_bytes = LEAF_BATCH_BYTES if max_bytes is None else max_bytes
  batch: list[_orbax.SavedLeaf] = []
  size = 0
  for leaf in leaves:
    nbytes = leaf.nbytes or 0
    if batch and size + nbytes > max_bytes:
      yield batch
      batch, size = [], 0
    batch.append(leaf)
    size += nbytes
  if batch:
    yield batch


def open_reader(item_dir: epath.Path) -> _orbax.LeafReader:
  try:
    return _orbax.LeafReader(item_dir)
  except FileNotFoundError:
    raise CliError(f"{item_dir} has no readable pytree metadata") from None


# ---------------------------------------------------------------------------
# Retention flags (gc and ls)
# ---------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
  """``"90" -> 90.0``, ``"30m" -> 1800.0``, ``"2h"``, ``"1d"``."""
  match = _DURATION.match(text.strip())
  if not match or float(match.group(1)) <= 0:
    raise argparse.ArgumentTypeError(f"a duration is a positive number of seconds or like 30m, 2h, 1d; got {text!r}")
  return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


KEEP_ALL = "all"


def parse_max_to_keep(text: str) -> int | str:
  """A positive number, or ``"all"`` (keep every step)."""
  if text == KEEP_ALL:
    return KEEP_ALL
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"--max-to-keep is a positive number or 'all', got {text!r}")
  return value


def parse_positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def add_retention_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "retention rules",
      "the Checkpointer fields of the same names; without them, the rules the run's writer recorded"
      " (checkpoints/RETENTION.json), else kckpt's defaults",
  )
  group.add_argument("--max-to-keep", type=parse_max_to_keep, metavar="N|all", help="keep the newest N steps (default 3), or with --best-metric the best N")
  group.add_argument("--keep-period", type=parse_positive_int, metavar="N", help="also keep every step divisible by N")
  group.add_argument("--keep-time-interval", type=parse_duration, metavar="DURATION", help="also keep one step per interval (seconds, or 30m, 2h, 1d)")
  group.add_argument("--best-metric", metavar="PATH", help="dotted path into the saved metrics (eval.loss) that ranks steps")
  group.add_argument("--best-mode", choices=policies.BEST_MODES, default=None, help="whether the best metric is highest (max, default) or lowest (min)")


def retention_flags_given(args: argparse.Namespace) -> bool:
  return any(getattr(args, n) is not None for n in ("max_to_keep", "keep_period", "keep_time_interval", "best_metric", "best_mode"))


_DEFAULT_MAX_TO_KEEP = 3  # the Checkpointer's default


def retention_policy(args: argparse.Namespace, location: "RunLocation | None" = None) -> policies.RetentionPolicy:
  if args.best_mode is not None and args.best_metric is None:
    raise CliError("--best-mode needs --best-metric")
  if not retention_flags_given(args) and location is not None:
    rules = steps_lib.read_retention_rules(location.checkpoints)
    if rules is not None:
      try:
        return policies.policy_from_rules(rules)
      except ValueError as e:
        raise CliError(f"{location.checkpoints}: {e}; pass the retention rules as flags") from None
  return policies.RetentionPolicy(
      max_to_keep=_DEFAULT_MAX_TO_KEEP if args.max_to_keep is None else (None if args.max_to_keep == KEEP_ALL else args.max_to_keep),
      keep_period=args.keep_period,
      keep_time_interval_secs=args.keep_time_interval,
      best_metric_path=args.best_metric,
      best_mode=args.best_mode or "max",
  )


def describe_policy(policy: policies.RetentionPolicy) -> str:
  parts = [f"max_to_keep={'all' if policy.max_to_keep is None else policy.max_to_keep}"]
  if policy.keep_period:
    parts.append(f"keep_period={policy.keep_period}")
  if policy.keep_time_interval_secs:
    parts.append(f"keep_time_interval={policy.keep_time_interval_secs:g}s")
  if policy.best_metric_path:
    parts.append(f"best_metric={policy.best_metric_path} ({policy.best_mode})")
  return ", ".join(parts)


def policy_as_dict(policy: policies.RetentionPolicy) -> dict[str, Any]:
  return {
      "max_to_keep": policy.max_to_keep,
      "keep_period": policy.keep_period,
      "keep_time_interval_secs": policy.keep_time_interval_secs,
      "best_metric": policy.best_metric_path,
      "best_mode": policy.best_mode,
  }


def step_record(details: steps_lib.StepDetails) -> policies.StepRecord:
  return policies.StepRecord(
      step=details.step,
      time=details.time.timestamp() if details.time else None,
      metrics=details.metrics,
  )


def read_details(location: RunLocation, finished: Sequence[Step]) -> list[steps_lib.StepDetails]:
  """Time, metrics and items of each step (small files only); steps deleted meanwhile are left out."""
  details = []
  for step in finished:
    try:
      details.append(steps_lib.read_step_details(location.checkpoints, step))
    except (FileNotFoundError, NotADirectoryError):
      continue
  return details


def safe_folder_size(path: epath.Path) -> int | None:
  try:
    return steps_lib.folder_size(path)
  except (FileNotFoundError, OSError):
    return None


# ---------------------------------------------------------------------------
# kckpt ls
# ---------------------------------------------------------------------------


def policy_source(args: argparse.Namespace, location: "RunLocation") -> str:
  if retention_flags_given(args):
    return "from flags"
  if steps_lib.read_retention_rules(location.checkpoints) is not None:
    return f"recorded by the run's writer in {steps_lib.RETENTION_FILE}"
  return "kckpt's defaults; pass the run's rules as flags"


def cmd_ls(args: argparse.Namespace) -> int:
  location = locate(args.run)
  listing = location.listing()
  policy = retention_policy(args, location)
  all_details = read_details(location, listing.finished)
  decisions = {d.step: d for d in policies.decide_retention(policy, [step_record(d) for d in all_details])}
  shown = [d for d in all_details if location.step is None or d.step == location.step]
  if location.step is not None and not shown:
    raise CliError(f"step {location.step} is not a finished step of {location.checkpoints}")
  sizes = {d.step: safe_folder_size(d.path) for d in shown}
  rows = []
  for d in shown:
    decision = decisions[d.step]
    rows.append({
        "step": d.step,
        "time": iso_time(d.time),
        "size_bytes": sizes[d.step],
        "items": list(d.user_items),
        "metrics": flatten_metrics(d.metrics),
        "tag": d.tag,
        "keep": decision.keep,
        "kept_by": list(decision.reasons),
    })
  unfinished = list(listing.unfinished) if location.step is None else []
  if args.json:
    print_json({
        "checkpoints": str(location.checkpoints),
        "retention": policy_as_dict(policy),
        "retention_from_flags": retention_flags_given(args),
        "steps": rows,
        "unfinished": unfinished,
    }, sys.stdout)
    return EXIT_OK

  total = sum(s for s in sizes.values() if s)
  print(f"{location.checkpoints}: {len(shown)} step{'s' * (len(shown) != 1)}, {human_bytes(total)}")
  if rows:
    metric_names = sorted({name for r in rows for name in r["metrics"]})
    best = policy.best_metric_path
    tags = any(r["tag"] for r in rows)
    headers = ["step", "saved", "size", "items"] + [f"{m}*" if m == best else m for m in metric_names] + (["tag"] if tags else []) + ["kept by"]
    table = []
    for r, d in zip(rows, shown):
      table.append(
          [str(r["step"]), format_time(d.time), human_bytes(r["size_bytes"]), ",".join(r["items"]) or "-"]
          + [format_number(r["metrics"][m]) if m in r["metrics"] else "" for m in metric_names]
          + ([r["tag"] or ""] if tags else [])
          + [", ".join(r["kept_by"]) or "-"]
      )
    right = frozenset({0, 2} | set(range(4, 4 + len(metric_names))))
    print(format_table(headers, table, right=right))
  if unfinished:
    print(f"unfinished (being written, or left by a crash): {', '.join(unfinished)}")
  print(f"kept by: retention {describe_policy(policy)} ({policy_source(args, location)}); -: not kept, gc would delete it")
  if policy.best_metric_path:
    print(f"*: the best metric ({policy.best_mode})")
  return EXIT_OK


# ---------------------------------------------------------------------------
# kckpt tree
# ---------------------------------------------------------------------------


def cmd_tree(args: argparse.Namespace) -> int:
  location = locate(args.run)
  step = resolve_step(location, args.step)
  step_path = location.step_path(step)
  items = step_items(step_path)
  if args.item is not None:
    if args.item not in items:
      raise CliError(f"step {step} has no item {args.item!r} (it has: {', '.join(sorted(items)) or 'none'})")
    items = {args.item: items[args.item]}
  report_items = []
  for name, fmt in items.items():
    item_dir = step_path / name
    entry: dict[str, Any] = {"item": name, "format": fmt, "disk_bytes": safe_folder_size(item_dir)}
    if fmt == "pytree":
      reader = open_reader(item_dir)
      entry["leaves"] = [
          {"path": leaf.path, "kind": leaf.kind, "shape": list(leaf.shape) if leaf.shape is not None else None,
           "dtype": str(leaf.dtype) if leaf.dtype is not None else None, "bytes": leaf.nbytes}
          for leaf in reader.leaves.values()
      ]
      entry["bytes"] = sum(leaf["bytes"] or 0 for leaf in entry["leaves"])
    report_items.append(entry)
  n_leaves = sum(len(e.get("leaves", ())) for e in report_items)
  n_bytes = sum(e.get("bytes", 0) for e in report_items)
  disk = sum(e["disk_bytes"] or 0 for e in report_items)
  if args.json:
    print_json({"checkpoints": str(location.checkpoints), "step": step, "items": report_items,
                "leaves": n_leaves, "bytes": n_bytes, "disk_bytes": disk}, sys.stdout)
    return EXIT_OK
  print(f"step {step} of {location.checkpoints}")
  rows = []
  for e in report_items:
    if e["format"] == "json":
      rows.append([leaf_label(e["item"], "<json>"), "-", "json", human_bytes(e["disk_bytes"])])
      continue
    for leaf in e["leaves"]:
      shape = "-" if leaf["shape"] is None else str(tuple(leaf["shape"]))
      rows.append([leaf_label(e["item"], leaf["path"]), shape, leaf["dtype"] or leaf["kind"], human_bytes(leaf["bytes"])])
  if rows:
    print(format_table(["path", "shape", "dtype", "bytes"], rows, right=frozenset({3})))
  print(f"total: {n_leaves} lea{'f' if n_leaves == 1 else 'ves'}, {human_bytes(n_bytes)} in memory, {human_bytes(disk)} on disk")
  return EXIT_OK


# ---------------------------------------------------------------------------
# kckpt diff
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRef:
  """One side of a diff: a step of a run."""

  location: RunLocation
  step: Step

  @property
  def path(self) -> epath.Path:
    return self.location.step_path(self.step)


_RUN_AT_STEP = re.compile(r"^(?P<run>.*)@(?P<step>\d+|latest)$")


def parse_side(text: str, other: str) -> tuple[str, Step | str | None]:
  """``"run@10" -> ("run", 10)``; ``"@20"`` is step 20 of `other`'s run; a plain path has no step."""
  match = _RUN_AT_STEP.match(text)
  if not match:
    return text, None
  run, step_text = match.group("run"), match.group("step")
  step = step_text if step_text == "latest" else int(step_text)
  if not run:
    other_match = _RUN_AT_STEP.match(other)
    run = other_match.group("run") if other_match else other
    if not run:
      raise CliError(f"{text!r} and {other!r}: give a run, e.g. kckpt diff /tmp/run@10 @20")
  return run, step


def resolve_side(text: str, other: str) -> StepRef:
  run, step = parse_side(text, other)
  location = locate(run)
  return StepRef(location, resolve_step(location, step))


@dataclasses.dataclass(frozen=True)
class LeafDiff:
  """How one leaf differs between A and B (values, shape or dtype).

  Attributes:
    leaf: the leaf's label (``params/dense.w``).
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


def spec_str(leaf: _orbax.SavedLeaf) -> str:
  """``"(4, 4) float32"``, ``"scalar int64"`` or ``"string"``."""
  if leaf.kind == "array":
    return f"{leaf.shape} {leaf.dtype}"
  if leaf.kind == "scalar" and leaf.dtype is not None:
    return f"scalar {leaf.dtype}"
  return leaf.kind


def compare_values(a: Any, b: Any) -> tuple[bool, float | None, float | None]:
  """(changed, max absolute difference, max relative difference) of two leaves.

  The relative difference is ``max |A-B| / max |A|`` (over A's finite values):
  how big the largest change is next to the leaf's scale. NaN in the same
  place on both sides counts as equal. Non-numeric leaves are only equal or
  not (no differences).
  """
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
  # bfloat16 and the other ML dtypes of `ml_dtypes` have kind "V" and cast to float64.
  return dtype.kind in "biufc" or (dtype.kind == "V" and np.can_cast(dtype, np.float64))


def diff_item(
    label_of: Callable[[str], str],
    reader_a: _orbax.LeafReader,
    reader_b: _orbax.LeafReader,
    progress: Progress,
    counts: dict[str, int],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[LeafDiff], int]:
  """Compares two saved pytree items leaf by leaf.

  Returns:
    (label, spec) of the leaves only in A, the same only in B, the leaves
    that differ, and how many are identical.
  """
  only_a = [(label_of(p), spec_str(leaf)) for p, leaf in reader_a.leaves.items() if p not in reader_b.leaves]
  only_b = [(label_of(p), spec_str(leaf)) for p, leaf in reader_b.leaves.items() if p not in reader_a.leaves]
  common = [p for p in reader_a.leaves if p in reader_b.leaves]
  differing: list[LeafDiff] = []
  identical = 0
  for batch in leaf_batches([reader_a.leaves[p] for p in common]):
    paths = [leaf.path for leaf in batch]
    values_a = reader_a.read(paths)
    values_b = reader_b.read(paths)
    for path in paths:
      leaf_a, leaf_b = reader_a.leaves[path], reader_b.leaves[path]
      changed, max_abs, max_rel = compare_values(values_a.pop(path), values_b.pop(path))
      diff = LeafDiff(label_of(path), spec_str(leaf_a), spec_str(leaf_b), max_abs, max_rel)
      if changed or diff.spec_changed:
        differing.append(diff)
      else:
        identical += 1
      counts["done"] += 1
      progress.update(f"diff: {counts['done']}/{counts['total']} leaves")
  return only_a, only_b, differing, identical


def cmd_diff(args: argparse.Namespace) -> int:
  side_a = resolve_side(args.a, args.b)
  side_b = resolve_side(args.b, args.a)
  items_a, items_b = step_items(side_a.path), step_items(side_b.path)
  progress = Progress()
  only_a: list[tuple[str, str]] = []
  only_b: list[tuple[str, str]] = []
  differing: list[LeafDiff] = []
  identical = 0
  readers = {}
  for name in items_a:
    if name in items_b and items_a[name] == items_b[name] == "pytree":
      readers[name] = (open_reader(side_a.path / name), open_reader(side_b.path / name))
  counts = {"done": 0, "total": sum(len(ra.leaves) for ra, _ in readers.values())}
  for name in sorted(items_a.keys() | items_b.keys()):
    whole = leaf_label(name, "<item>") if name != steps_lib.DEFAULT_ITEM else "<default item>"
    if name not in items_b:
      only_a.append((whole, items_a[name]))
    elif name not in items_a:
      only_b.append((whole, items_b[name]))
    elif items_a[name] != items_b[name]:
      differing.append(LeafDiff(whole, items_a[name], items_b[name]))
    elif items_a[name] == "json":
      value_a = _orbax.read_items(side_a.path, [_orbax.ItemRead(name=name, format="json")])[name]
      value_b = _orbax.read_items(side_b.path, [_orbax.ItemRead(name=name, format="json")])[name]
      if value_a != value_b:
        differing.append(LeafDiff(leaf_label(name, "<json>"), "json", "json"))
      else:
        identical += 1
    else:
      reader_a, reader_b = readers[name]
      a, b, d, same = diff_item(lambda p, n=name: leaf_label(n, p), reader_a, reader_b, progress, counts)
      only_a += a
      only_b += b
      differing += d
      identical += same
  progress.clear()
  equal = not (only_a or only_b or differing)
  if args.json:
    print_json({
        "a": {"path": str(side_a.path), "step": side_a.step},
        "b": {"path": str(side_b.path), "step": side_b.step},
        "only_in_a": [{"leaf": label, "spec": spec} for label, spec in only_a],
        "only_in_b": [{"leaf": label, "spec": spec} for label, spec in only_b],
        "changed": [dataclasses.asdict(d) for d in differing],
        "identical": identical,
        "equal": equal,
    }, sys.stdout)
    return EXIT_OK if equal else EXIT_FOUND
  print(f"A: {side_a.path}")
  print(f"B: {side_b.path}")
  for label, spec in only_a:
    print(f"only in A: {label}  {spec}")
  for label, spec in only_b:
    print(f"only in B: {label}  {spec}")
  if differing:
    rows = []
    for d in differing:
      spec = d.a if not d.spec_changed else f"{d.a} -> {d.b}"
      rows.append([d.leaf, spec, _format_diff(d.max_abs_diff), _format_diff(d.max_rel_diff)])
    print(format_table(["changed", "shape dtype (A -> B)", "max abs diff", "max rel diff"], rows, right=frozenset({2, 3})))
  print(
      f"{len(differing)} changed, {len(only_a)} only in A, {len(only_b)} only in B, {identical} identical"
      + ("" if not differing else "  (rel: max |A-B| / max |A|)")
  )
  return EXIT_OK if equal else EXIT_FOUND


def _format_diff(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}"


# ---------------------------------------------------------------------------
# kckpt verify
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
  step: Step
  item: str
  leaf: str
  problem: str

  def __str__(self) -> str:
    return f"step {self.step}, item {self.item}, leaf {self.leaf}: {self.problem}"


def _check_leaf_value(leaf: _orbax.SavedLeaf, value: Any, *, check_finite: bool) -> str | None:
  """What is wrong with a leaf read from disk, or None."""
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
    step: Step, name: str, item_dir: epath.Path, *, check_finite: bool, progress: Progress, prefix: str
) -> tuple[list[Problem], int, int]:
  """Reads every leaf of one item; (problems, leaves read, bytes read)."""
  try:
    reader = _orbax.LeafReader(item_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught
    return [Problem(step, name, "<metadata>", f"unreadable: {short_error(e)}")], 0, 0
  problems: list[Problem] = []
  leaves_read = bytes_read = 0
  total = len(reader.leaves)
  for batch in leaf_batches(list(reader.leaves.values())):
    try:
      values = reader.read([leaf.path for leaf in batch])
    except Exception:  # pylint: disable=broad-exception-caught
      values = {}
      for leaf in batch:  # read one at a time to name the leaves at fault
        try:
          values.update(reader.read([leaf.path]))
        except Exception as e:  # pylint: disable=broad-exception-caught
          problems.append(Problem(step, name, leaf.path, f"unreadable: {short_error(e)}"))
    for leaf in batch:
      if leaf.path not in values:
        continue
      fault = _check_leaf_value(leaf, values.pop(leaf.path), check_finite=check_finite)
      if fault:
        problems.append(Problem(step, name, leaf.path, fault))
      leaves_read += 1
      bytes_read += leaf.nbytes or 0
    progress.update(f"{prefix}{name}: {leaves_read}/{total} leaves, {human_bytes(bytes_read)}")
  return problems, leaves_read, bytes_read


def verify_step(location: RunLocation, step: Step, *, check_finite: bool, progress: Progress, prefix: str) -> dict[str, Any]:
  """Checks one step: its metadata, every item, every leaf. Returns a report."""
  step_path = location.step_path(step)
  report: dict[str, Any] = {"step": step, "items": 0, "leaves": 0, "bytes": 0, "problems": [], "deleted": False}
  problems: list[Problem] = report["problems"]
  metadata_file = step_path / steps_lib.STEP_METADATA_FILE
  try:
    if metadata_file.exists():
      json.loads(metadata_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
    problems.append(Problem(step, "-", "-", f"{steps_lib.STEP_METADATA_FILE} unreadable: {short_error(e)}"))
  try:
    handlers = steps_lib.read_item_names(step_path)
  except FileNotFoundError:
    report["deleted"] = True
    return report
  for name, handler in handlers.items():
    item_dir = step_path / name
    if not item_dir.exists():
      if not step_path.exists():
        report["deleted"] = True
        return report
      problems.append(Problem(step, name, "-", "the item's folder is missing"))
      continue
    report["items"] += 1
    if _orbax.item_format(handler) == "json":
      try:
        if name == steps_lib.METRICS_ITEM:  # Orbax's own file name for metrics
          steps_lib.read_step_metrics(step_path)
        else:
          _orbax.read_items(step_path, [_orbax.ItemRead(name=name, format="json")])
      except Exception as e:  # pylint: disable=broad-exception-caught
        problems.append(Problem(step, name, "<json>", f"unreadable: {short_error(e)}"))
      continue
    item_problems, leaves, nbytes = verify_pytree_item(
        step, name, item_dir, check_finite=check_finite, progress=progress, prefix=prefix
    )
    problems.extend(item_problems)
    report["leaves"] += leaves
    report["bytes"] += nbytes
  if problems and not step_path.exists():  # removed by the run's retention while we read it
    report.update(deleted=True, problems=[])
  return report


def cmd_verify(args: argparse.Namespace) -> int:
  location = locate(args.run)
  steps = steps_to_visit(location, args.step)
  progress = Progress()
  reports = []
  for i, step in enumerate(steps, start=1):
    prefix = f"verify step {step} ({i}/{len(steps)}) "
    progress.update(prefix, force=True)
    reports.append(verify_step(location, step, check_finite=args.check_finite, progress=progress, prefix=prefix))
    if not args.json:
      progress.clear()
      print(_verify_line(reports[-1]), flush=True)
  progress.clear()
  problems = [p for r in reports for p in r["problems"]]
  if args.json:
    print_json({
        "checkpoints": str(location.checkpoints),
        "steps": [{**r, "problems": [dataclasses.asdict(p) for p in r["problems"]]} for r in reports],
        "problems": [dataclasses.asdict(p) for p in problems],
        "ok": not problems,
    }, sys.stdout)
    return EXIT_FOUND if problems else EXIT_OK
  for p in problems:
    print(f"PROBLEM {p}")
  checked = [r for r in reports if not r["deleted"]]
  bad_steps = sum(1 for r in reports if r["problems"])
  if problems:
    print(f"FAILED: {len(problems)} problem{'s' * (len(problems) != 1)} in {bad_steps} of {len(checked)} steps")
    return EXIT_FOUND
  total = sum(r["bytes"] for r in checked)
  print(f"OK: {len(checked)} step{'s' * (len(checked) != 1)}, {sum(r['leaves'] for r in checked)} leaves, {human_bytes(total)} read")
  return EXIT_OK


def _verify_line(report: Mapping[str, Any]) -> str:
  if report["deleted"]:
    return f"step {report['step']}: skipped (deleted while verifying)"
  n = len(report["problems"])
  status = "ok" if not n else f"{n} problem{'s' * (n != 1)}"
  return f"step {report['step']}: {status} ({report['items']} items, {report['leaves']} leaves, {human_bytes(report['bytes'])})"


# ---------------------------------------------------------------------------
# kckpt gc
# ---------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
  location = locate_run(args.run, "gc")
  if not retention_flags_given(args) and steps_lib.read_retention_rules(location.checkpoints) is None:
    raise CliError(
        f"gc needs the run's retention rules: {location.checkpoints} has no {steps_lib.RETENTION_FILE} (written by"
        " kckpt writers), so pass them as flags: --max-to-keep N|all, --keep-period N, --keep-time-interval DURATION,"
        " --best-metric PATH [--best-mode min|max]"
    )
  policy = retention_policy(args, location)
  details = read_details(location, location.listing().finished)
  decisions = policies.decide_retention(policy, [step_record(d) for d in details])
  doomed = [d.step for d in decisions if not d.keep]
  sizes = {s: safe_folder_size(location.step_path(s)) for s in doomed}
  freed = sum(s or 0 for s in sizes.values())
  deleted: list[Step] = []
  if not args.json:
    print(f"{location.checkpoints}: retention {describe_policy(policy)} ({policy_source(args, location)})")
    rows = [
        [str(d.step), "keep" if d.keep else "delete", ", ".join(d.reasons) or "-", human_bytes(sizes.get(d.step)) if not d.keep else ""]
        for d in decisions
    ]
    if rows:
      print(format_table(["step", "action", "kept by", "frees"], rows, right=frozenset({0, 3})))
  if doomed and not args.dry_run:
    if not args.yes:
      if not _is_terminal(sys.stdin):
        raise CliError("refusing to delete without confirmation: stdin is not a terminal; pass --yes (or --dry-run)")
      answer = input(f"Delete {len(doomed)} step{'s' * (len(doomed) != 1)} ({human_bytes(freed)}) from {location.checkpoints}? [y/N] ")
      if answer.strip().lower() not in ("y", "yes"):
        print("nothing deleted")
        return EXIT_OK
    for step in doomed:
      if steps_lib.remove_step_folder(location.checkpoints, step):
        deleted.append(step)
        if not args.json:
          print(f"deleted step {step}", flush=True)
  if args.json:
    print_json({
        "checkpoints": str(location.checkpoints),
        "retention": policy_as_dict(policy),
        "dry_run": args.dry_run,
        "decisions": [d.as_dict() for d in decisions],
        "to_delete": doomed,
        "deleted": deleted,
        "bytes_to_free": freed,
    }, sys.stdout)
    return EXIT_OK
  if not doomed:
    print("nothing to delete")
  elif args.dry_run:
    print(f"dry run: would delete {len(doomed)} step{'s' * (len(doomed) != 1)}, {human_bytes(freed)}; nothing deleted")
  else:
    print(f"deleted {len(deleted)} step{'s' * (len(deleted) != 1)}, {human_bytes(sum(sizes[s] or 0 for s in deleted))} freed")
  return EXIT_OK


# ---------------------------------------------------------------------------
# kckpt watch
# ---------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace) -> int:
  location = locate_run(args.run, "watch")
  last_new = time.monotonic()
  end_marker = location.checkpoints / markers.END_MARKER

  def should_stop() -> bool:
    if args.until_finished and end_marker.exists():
      return True
    return args.timeout is not None and time.monotonic() - last_new >= args.timeout

  stop = should_stop if (args.until_finished or args.timeout is not None) else None
  for step in watch.new_steps(
      lambda: location.listing().finished,
      after=-1 if args.all else None,
      timeout_fn=stop,
      poll_interval_secs=args.interval,
  ):
    last_new = time.monotonic()
    try:
      details = steps_lib.read_step_details(location.checkpoints, step)
    except (FileNotFoundError, NotADirectoryError):
      continue  # deleted by the run's retention before we looked
    metrics = flatten_metrics(details.metrics)
    if args.json:
      json.dump(_jsonable({"step": step, "time": iso_time(details.time), "path": str(details.path),
                           "items": list(details.user_items), "metrics": metrics}), sys.stdout)
      sys.stdout.write("\n")
    else:
      shown = "  ".join(f"{k}={format_number(v)}" for k, v in metrics.items())
      print(f"step {step}  {format_time(details.time)}  {','.join(details.user_items)}" + (f"  {shown}" if shown else ""))
    sys.stdout.flush()
  return EXIT_OK


# ---------------------------------------------------------------------------
# kckpt export
# ---------------------------------------------------------------------------


def _export_sources(step_path: epath.Path, items: dict[str, str], names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
  """Exported name -> (item read, top-level key of it or None)."""
  sources: dict[str, tuple[str, str | None]] = {}
  default_keys: list[str] | None = None
  for name in names:
    if name in items:
      sources[name] = (name, None)
      continue
    if steps_lib.DEFAULT_ITEM in items and items[steps_lib.DEFAULT_ITEM] == "pytree":
      if default_keys is None:
        default_keys = open_reader(step_path / steps_lib.DEFAULT_ITEM).top_level_keys()
      if name in default_keys:
        sources[name] = (steps_lib.DEFAULT_ITEM, name)
        continue
    fields = f"; fields of its default item: {', '.join(default_keys)}" if default_keys else ""
    raise CliError(f"step {steps_lib.parse_step(step_path.name)} has no item {name!r} (items: {', '.join(sorted(items)) or 'none'}{fields})")
  return sources


def cmd_export(args: argparse.Namespace) -> int:
  location = locate(args.run)
  step = resolve_step(location, args.step)
  step_path = location.step_path(step)
  names = [n for group in args.items for n in group.split(",") if n]
  if not names:
    raise CliError("--items names at least one item (e.g. --items params)")
  out = epath.Path(args.out)
  if out.exists() and not out.is_dir():
    raise CliError(f"OUT exists and is not a folder: {args.out}")
  out_step = steps_lib.step_dir(steps_lib.checkpoints_dir(out), step)
  if out_step.exists():
    raise CliError(f"{out_step} exists already; kckpt never overwrites a step")
  items = step_items(step_path)
  sources = _export_sources(step_path, items, names)
  progress = Progress()
  exported: dict[str, Any] = {}
  summary = []
  for name, (item, key) in sources.items():
    if items[item] == "json":
      exported[name] = items_lib.Json(_orbax.read_items(step_path, [_orbax.ItemRead(name=item, format="json")])[item])
      summary.append({"item": name, "from": item, "format": "json", "leaves": 0, "bytes": 0})
      continue
    reader = open_reader(step_path / item)
    prefix = "" if key is None else f"{key}."
    leaves = [leaf for path, leaf in reader.leaves.items() if key is None or path.startswith(prefix)]
    values: dict[str, Any] = {}
    done = 0
    for batch in leaf_batches(leaves):
      values.update(reader.read([leaf.path for leaf in batch]))
      done += len(batch)
      progress.update(f"export: reading {name} {done}/{len(leaves)} leaves")
    exported[name] = reader.rebuild(values, top_level_key=key)
    summary.append({"item": name, "from": item if key is None else f"{item}.{key}", "format": "pytree",
                    "leaves": len(leaves), "bytes": sum(leaf.nbytes or 0 for leaf in leaves)})
  progress.update("export: writing", force=True)
  metrics = steps_lib.read_step_metrics(step_path)
  writer = checkpointer_lib.Checkpointer(workdir=out, save_interval_steps=None, max_to_keep=None, async_save=False)
  try:
    writer.save(items_lib.Composite(**exported), step=step, metrics=metrics)
  finally:
    writer.close()
    progress.clear()
  if args.json:
    print_json({"source": str(step_path), "out": str(out), "step": step, "path": str(out_step), "items": summary}, sys.stdout)
    return EXIT_OK
  for s in summary:
    detail = "json" if s["format"] == "json" else f"{s['leaves']} leaves, {human_bytes(s['bytes'])}"
    print(f"exported {s['item']} (from {s['from']}): {detail}")
  print(f"wrote step {step} to {out_step}")
  return EXIT_OK


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

_RUN_HELP = "a workdir, its checkpoints/ folder, or one ckpt_<step> folder"

_COMMANDS: dict[str, tuple[str, str]] = {
    "ls": (
        "list the steps of a run: time, size, items, metrics and the rule that keeps each",
        "examples:\n"
        "  kckpt ls /tmp/run\n"
        "  kckpt ls /tmp/run --max-to-keep 2 --best-metric eval.loss --best-mode min\n"
        "  kckpt ls /tmp/run --json | jq '.steps[].step'",
    ),
    "tree": (
        "show the saved tree of a step: path, shape, dtype, bytes (metadata only, no array read)",
        "examples:\n"
        "  kckpt tree /tmp/run                 # the newest step\n"
        "  kckpt tree /tmp/run --step 1000 --item params\n"
        "  kckpt tree /tmp/run/checkpoints/ckpt_1000 --json",
    ),
    "diff": (
        "compare two steps, leaf by leaf: only in A, only in B, shape/dtype and value changes",
        "A and B are RUN[@STEP] (the newest step without @STEP); '@STEP' alone means\n"
        "a step of the other argument's run. Arrays are read a batch of leaves at a\n"
        "time, never the whole tree. max rel diff is max |A-B| / max |A| per leaf.\n"
        "Exit status: 0 when identical, 1 when they differ, 2 on error.\n\n"
        "examples:\n"
        "  kckpt diff /tmp/run@1000 @2000\n"
        "  kckpt diff /tmp/run_a /tmp/run_b           # the newest step of each\n"
        "  kckpt diff /tmp/run/checkpoints/ckpt_10 /tmp/run/checkpoints/ckpt_20 --json",
    ),
    "verify": (
        "read every array of every step (or one) and check shapes and dtypes against the metadata",
        "Reports each problem with its step, item and leaf; exit status 1 if any.\n"
        "Orbax stores no checksums: a flipped bit inside an array goes unseen; a\n"
        "truncated, missing or undecodable file does not.\n\n"
        "examples:\n"
        "  kckpt verify /tmp/run                 # every step\n"
        "  kckpt verify /tmp/run --step 1000 --check-finite\n"
        "  kckpt verify /tmp/run --json",
    ),
    "gc": (
        "delete the steps that the retention rules (given as flags) do not keep",
        "Shows each step with the rule that keeps it, then deletes the others after\n"
        "a prompt (--yes skips it; --dry-run only shows). The newest step is always\n"
        "kept. Each step folder is renamed out of sight before it is removed, so a\n"
        "reader never sees half a step.\n\n"
        "examples:\n"
        "  kckpt gc /tmp/run --max-to-keep 3 --keep-period 10000 --dry-run\n"
        "  kckpt gc /tmp/run --max-to-keep 2 --best-metric eval.loss --best-mode min --yes",
    ),
    "watch": (
        "print each new finished step as it appears (the eval-job poller), until interrupted",
        "Starts with the newest step that exists (--all: every step), then each new one.\n"
        "--json prints one JSON object per line.\n\n"
        "examples:\n"
        "  kckpt watch /tmp/run\n"
        "  kckpt watch /tmp/run --until-finished --timeout 3600\n"
        "  kckpt watch /tmp/run --json | while read -r line; do ...; done",
    ),
    "export": (
        "write a weights-only checkpoint of some items of a step to a new run folder OUT",
        "NAME is an item of the step (--items params,ema_params) or, for a run that saves\n"
        "one state, a top-level field of it (the params of a TrainState). OUT gets\n"
        "OUT/checkpoints/ckpt_<step>/<NAME>/ (plus the step's metrics), which\n"
        "kckpt.Checkpointer.open(OUT).restore(kckpt.items.Composite(params=...)) and\n"
        "plain Orbax read. The exported items are held in memory while written.\n\n"
        "examples:\n"
        "  kckpt export /tmp/run --step 1000 --items params /tmp/run_weights\n"
        "  kckpt export /tmp/run --items params,ema_params /tmp/weights",
    ),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="See, compare, check and clean kckpt / Orbax checkpoints from a shell.",
      epilog="RUN is " + _RUN_HELP + ".\nRun 'kckpt COMMAND --help' for a command's flags and examples.\n\n"
      "examples:\n  kckpt ls /tmp/run\n  kckpt tree /tmp/run --step 1000\n  kckpt verify /tmp/run",
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  def command(name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    summary, epilog = _COMMANDS[name]
    sub = commands.add_parser(name, help=summary, description=summary, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.set_defaults(func=func)
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return sub

  ls = command("ls", cmd_ls)
  ls.add_argument("run", metavar="RUN", help=_RUN_HELP)
  add_retention_flags(ls)

  tree = command("tree", cmd_tree)
  tree.add_argument("run", metavar="RUN", help=_RUN_HELP)
  tree.add_argument("--step", type=parse_step_arg, help="the step (default: the newest)")
  tree.add_argument("--item", help="only this item (e.g. params)")

  diff = command("diff", cmd_diff)
  diff.add_argument("a", metavar="A", help="RUN[@STEP]")
  diff.add_argument("b", metavar="B", help="RUN[@STEP] or @STEP")

  verify = command("verify", cmd_verify)
  verify.add_argument("run", metavar="RUN", help=_RUN_HELP)
  verify.add_argument("--step", type=parse_step_arg, help="only this step (default: every step)")
  verify.add_argument("--check-finite", action="store_true", help="also report float leaves holding NaN or infinity")

  gc = command("gc", cmd_gc)
  gc.add_argument("run", metavar="RUN", help="a workdir or its checkpoints/ folder")
  gc.add_argument("--dry-run", action="store_true", help="show what would be deleted; delete nothing")
  gc.add_argument("--yes", "-y", action="store_true", help="delete without asking")
  add_retention_flags(gc)

  watch = command("watch", cmd_watch)
  watch.add_argument("run", metavar="RUN", help="a workdir or its checkpoints/ folder")
  watch.add_argument("--timeout", type=parse_duration, metavar="DURATION", help="stop after this long without a new step")
  watch.add_argument("--until-finished", action="store_true", help="stop once the trainer wrote its end marker (kckpt.write_end_marker)")
  watch.add_argument("--all", action="store_true", help="print every existing step first, not only the newest")
  watch.add_argument("--interval", type=parse_duration, default=1.0, metavar="SECONDS", help="seconds between two listings (default 1)")

  export = command("export", cmd_export)
  export.add_argument("run", metavar="RUN", help=_RUN_HELP)
  export.add_argument("out", metavar="OUT", help="the new run folder to write")
  export.add_argument("--step", type=parse_step_arg, help="the step (default: the newest)")
  export.add_argument("--items", action="append", required=True, metavar="NAME[,NAME]", help="the items (or top-level fields) to export")
  return parser


def _quiet_libraries() -> None:
  """Keeps Orbax's and absl's log lines out of the command's output."""
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("kckpt").setLevel(logging.WARNING)
  try:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_platforms", "cpu")  # the command never needs an accelerator
  except Exception:  # pylint: disable=broad-exception-caught
    pass  # a backend is already up (main() called from Python): use it


def _drop_closed_loop_noise(unraisable: Any) -> None:
  """Drops a harmless traceback that Python would print after a failed read.

  Orbax 0.12 runs each read on a fresh asyncio loop and closes it; when one
  array fails to read (a corrupted file for `verify`), TensorStore's callbacks
  for the other arrays land on the closed loop.
  """
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
    return
  sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the `kckpt` command; returns its exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  _quiet_libraries()
  # Left installed: the callbacks may come late, even while the process exits.
  sys.unraisablehook = _drop_closed_loop_noise
  try:
    return args.func(args)
  except CliError as e:
    _print_error(args.command, str(e))
  except (errors.CheckpointNotFoundError, errors.StepAlreadyExistsError) as e:
    _print_error(args.command, str(e))
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  except BrokenPipeError:
    _silence_stdout()
    return EXIT_OK
  except Exception as e:  # pylint: disable=broad-exception-caught
    if os.environ.get("KCKPT_DEBUG"):
      raise
    _print_error(args.command, short_error(e) + " (KCKPT_DEBUG=1 shows the traceback)")
  return EXIT_ERROR


def _print_error(command: str, message: str) -> None:
  print(f"{PROG} {command}: error: {' '.join(message.split())}", file=sys.stderr)


def _silence_stdout() -> None:
  # Output piped into `head`: the reader left; exit quietly, without a second error at shutdown.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
  sys.exit(main())
