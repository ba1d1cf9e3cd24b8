"""``kckpt gc RUN``: delete the steps that the retention rules do not keep (the only command that deletes)."""

from __future__ import annotations

import argparse
import sys

from kckpt import _layout
from kckpt import _orbax
from kckpt import inspect
from kckpt import policies
from kckpt._types import Step
from kckpt.cli import _common
from kckpt.cli import _format
from kckpt.errors import CliError

SUMMARY = "delete the steps that the retention rules (given as flags) do not keep"
EPILOG = """\
Shows each step with the rule that keeps it, then deletes the others after
a prompt (--yes skips it; --dry-run only shows). The newest step is always
kept. Each step folder is renamed out of sight before it is removed, so a
reader never sees half a step.

examples:
  kckpt gc /tmp/run --max-to-keep 3 --keep-period 10000 --dry-run
  kckpt gc /tmp/run --max-to-keep 2 --best-metric eval.loss --best-mode min --yes"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help="a workdir or its checkpoints/ folder")
  parser.add_argument("--dry-run", action="store_true", help="show what would be deleted; delete nothing")
  parser.add_argument("--yes", "-y", action="store_true", help="delete without asking")
  _common.add_retention_flags(parser)


def run(args: argparse.Namespace) -> int:
  location = _common.locate_run(args.run, "gc")
  if not _common.retention_flags_given(args) and _layout.read_retention_rules(location.checkpoints) is None:
    raise CliError(
      f"gc needs the run's retention rules: {location.checkpoints} has no {_layout.RETENTION_FILE} (written by"
      " kckpt writers), so pass them as flags: --max-to-keep N|all, --keep-period N, --keep-time-interval DURATION,"
      " --best-metric PATH [--best-mode min|max]"
    )
  policy = _common.retention_policy(args, location)
  rows = inspect.summary_rows(location.checkpoints, retention=policy, sizes=False)
  decisions = [r.decision for r in rows if r.decision is not None]
  doomed = [d.step for d in decisions if not d.keep]
  sizes = {s: inspect.disk_bytes(location.step_path(s)) for s in doomed}
  freed = sum(s or 0 for s in sizes.values())
  deleted: list[Step] = []
  if not args.json:
    print(f"{location.checkpoints}: retention {policies.describe(policy)} ({_common.policy_source(args, location)})")
    table = [
      [
        str(d.step),
        "keep" if d.keep else "delete",
        ", ".join(d.reasons) or "-",
        _format.human_bytes(sizes.get(d.step)) if not d.keep else "",
      ]
      for d in decisions
    ]
    if table:
      print(_format.format_table(["step", "action", "kept by", "frees"], table, right=frozenset({0, 3})))
  if doomed and not args.dry_run:
    question = f"Delete {_format.plural(len(doomed), 'step')} ({_format.human_bytes(freed)}) from {location.checkpoints}?"
    if not args.yes and not _confirm(question):
      print("nothing deleted")
      return _common.EXIT_OK
    for step in doomed:
      if _orbax.remove_step_folder(location.checkpoints, step):
        deleted.append(step)
        if not args.json:
          print(f"deleted step {step}", flush=True)
  if args.json:
    _format.print_json(
      {
        "checkpoints": str(location.checkpoints),
        "retention": policies.retention_rules(policy),
        "dry_run": args.dry_run,
        "decisions": [d.as_dict() for d in decisions],
        "to_delete": doomed,
        "deleted": deleted,
        "bytes_to_free": freed,
      }
    )
    return _common.EXIT_OK
  if not doomed:
    print("nothing to delete")
  elif args.dry_run:
    print(f"dry run: would delete {_format.plural(len(doomed), 'step')}, {_format.human_bytes(freed)}; nothing deleted")
  else:
    print(f"deleted {_format.plural(len(deleted), 'step')}, {_format.human_bytes(sum(sizes[s] or 0 for s in deleted))} freed")
  return _common.EXIT_OK


def _confirm(question: str) -> bool:
  if not _format.is_terminal(sys.stdin):
    raise CliError("refusing to delete without confirmation: stdin is not a terminal; pass --yes (or --dry-run)")
  return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
