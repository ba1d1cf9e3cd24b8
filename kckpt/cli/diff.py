"""``kckpt diff A B``: two steps compared leaf by leaf (only in A, only in B, shape and value changes)."""

from __future__ import annotations

import argparse
import dataclasses

from kckpt import inspect
from kckpt._types import EPath, Step
from kckpt.cli import _common
from kckpt.cli import _format

SUMMARY = "compare two steps, leaf by leaf: only in A, only in B, shape/dtype and value changes"
EPILOG = """\
A and B are RUN[@STEP] (the newest step without @STEP); '@STEP' alone means
a step of the other argument's run. STEP is a number, -1 or latest, best (by
the run's retention rules) or a tag given to save. Arrays are read a batch of
leaves at a time, never the whole tree. max rel diff is max |A-B| / max |A|
per leaf. Differences in what made the two steps (provenance: versions,
devices, host, git, config) are listed too; they do not change the exit
status. Exit status: 0 when the arrays are identical, 1 when they differ, 2
on error.

examples:
  kckpt diff /tmp/run@1000 @2000
  kckpt diff /tmp/run@best @latest
  kckpt diff /tmp/run_a /tmp/run_b           # the newest step of each
  kckpt diff /tmp/run/checkpoints/ckpt_10 /tmp/run/checkpoints/ckpt_20 --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("a", metavar="A", help="RUN[@STEP]")
  parser.add_argument("b", metavar="B", help="RUN[@STEP] or @STEP")


@dataclasses.dataclass(frozen=True)
class StepRef:
  """One side of a diff: a step of a run."""

  location: _common.RunLocation
  step: Step

  @property
  def path(self) -> EPath:
    return self.location.step_path(self.step)


def resolve_side(text: str, other: str) -> StepRef:
  run, step = _common.split_run_at_step(text, other)
  location = _common.locate(run)
  return StepRef(location, _common.resolve_step(location, step))


def run(args: argparse.Namespace) -> int:
  side_a = resolve_side(args.a, args.b)
  side_b = resolve_side(args.b, args.a)
  progress = _format.Progress()
  try:
    diff = inspect.diff_steps(side_a.path, side_b.path, progress=progress.callback("diff: "))
  finally:
    progress.clear()
  status = _common.EXIT_OK if diff.equal else _common.EXIT_FOUND
  provenance = inspect.step_provenance_differences(side_a.path, side_b.path)
  if args.json:
    _format.print_json(
      {
        "a": {"path": str(side_a.path), "step": side_a.step},
        "b": {"path": str(side_b.path), "step": side_b.step},
        **diff.as_dict(),
        "provenance_differences": [{"key": k, "a": x, "b": y} for k, x, y in provenance],
      }
    )
    return status
  print(f"A: {side_a.path}")
  print(f"B: {side_b.path}")
  for label, spec in diff.only_in_a:
    print(f"only in A: {label}  {spec}")
  for label, spec in diff.only_in_b:
    print(f"only in B: {label}  {spec}")
  if diff.changed:
    rows = []
    for d in diff.changed:
      spec = d.a if not d.spec_changed else f"{d.a} -> {d.b}"
      rows.append([d.leaf, spec, _format_diff(d.max_abs_diff), _format_diff(d.max_rel_diff)])
    headers = ["changed", "shape dtype (A -> B)", "max abs diff", "max rel diff"]
    print(_format.format_table(headers, rows, right=frozenset({2, 3})))
  for key, x, y in provenance:
    print(f"provenance {key}: {_format.compact_json(x, 80)} -> {_format.compact_json(y, 80)}")
  print(
    f"{len(diff.changed)} changed, {len(diff.only_in_a)} only in A, {len(diff.only_in_b)} only in B,"
    f" {diff.identical} identical" + ("" if not diff.changed else "  (rel: max |A-B| / max |A|)")
  )
  return status


def _format_diff(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}"
