"""``kckpt verify RUN``: read every array of every step (or one) and check it against the metadata."""

from __future__ import annotations

import argparse

from kckpt import inspect
from kckpt.cli import _common
from kckpt.cli import _format

SUMMARY = "read every array of every step (or one) and check shapes and dtypes against the metadata"
EPILOG = """\
Reports each problem with its step, item and leaf; exit status 1 if any.
Steps saved by kckpt carry a CRC32C of each saved shard of array data, checked as
each shard is read: a changed bit is a problem naming its leaf. Steps saved
without (plain Orbax, older kckpt, StorageOptions(checksums=False)) say
"no checksums": there a flipped bit
inside an array goes unseen; a truncated, missing or undecodable file does not.
An array a checksummed step has no checksum for (its shards did not tile it at
save, a warning then, or the checksum file edited) is named on the step's line.

examples:
  kckpt verify /tmp/run                 # every step
  kckpt verify /tmp/run --step 1000 --check-finite
  kckpt verify /tmp/run --step best
  kckpt verify /tmp/run --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help=_common.RUN_HELP)
  parser.add_argument("--step", type=_common.parse_step_arg, help=f"only this step (default: every step): {_common.STEP_HELP}")
  parser.add_argument("--check-finite", action="store_true", help="also report float leaves holding NaN or infinity")


def run(args: argparse.Namespace) -> int:
  location = _common.locate(args.run)
  steps = _common.steps_to_visit(location, args.step, args)
  progress = _format.Progress()
  reports = []
  for i, step in enumerate(steps, start=1):
    prefix = f"verify step {step} ({i}/{len(steps)}) "
    progress.update(prefix, force=True)
    reports.append(
      inspect.verify_step(location.checkpoints, step, check_finite=args.check_finite, progress=progress.callback(prefix))
    )
    if not args.json:
      progress.clear()
      print(_verify_line(reports[-1]), flush=True)
  progress.clear()
  problems = [p for r in reports for p in r.problems]
  status = _common.EXIT_FOUND if problems else _common.EXIT_OK
  if args.json:
    _format.print_json(
      {
        "checkpoints": str(location.checkpoints),
        "steps": [r.as_dict() for r in reports],
        "problems": [p.as_dict() for p in problems],
        "ok": not problems,
      }
    )
    return status
  for p in problems:
    print(f"PROBLEM {p}")
  checked = [r for r in reports if not r.deleted]
  if problems:
    bad_steps = sum(1 for r in reports if r.problems)
    print(f"FAILED: {_format.plural(len(problems), 'problem')} in {bad_steps} of {len(checked)} steps")
    return status
  leaves = sum(r.leaves for r in checked)
  unchecked = sum(1 for r in checked if r.checksums is None)
  note = f"; {unchecked} without checksums" if unchecked else ""
  partly = sum(1 for r in checked if r.unchecked)
  note += f"; {partly} with arrays that have no checksum" if partly else ""
  nbytes = _format.human_bytes(sum(r.bytes for r in checked))
  print(f"OK: {_format.plural(len(checked), 'step')}, {leaves} leaves, {nbytes} read{note}")
  return status


_NAMED_UNCHECKED = 5  # arrays without a checksum named on a step's line


def _verify_line(report: inspect.StepCheck) -> str:
  if report.deleted:
    return f"step {report.step}: skipped (deleted while verifying)"
  n = len(report.problems)
  status = "ok" if not n else _format.plural(n, "problem")
  checksums = f"{report.checksums} checksums" if report.checksums else "no checksums"
  if report.unchecked:
    shown = ", ".join(report.unchecked[:_NAMED_UNCHECKED]) + (", ..." if len(report.unchecked) > _NAMED_UNCHECKED else "")
    checksums += f"; {_format.plural(len(report.unchecked), 'array')} without one: {shown}"
  return (
    f"step {report.step}: {status} ({report.items} items, {report.leaves} leaves,"
    f" {_format.human_bytes(report.bytes)}, {checksums})"
  )
