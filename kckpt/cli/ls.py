"""``kckpt ls RUN``: the steps of a run, with time, size, items, metrics and the rule that keeps each."""

from __future__ import annotations

import argparse

from kckpt import inspect
from kckpt import policies
from kckpt.cli import _common
from kckpt.cli import _format
from kckpt.errors import CliError

SUMMARY = "list the steps of a run: time, size, items, metrics and the rule that keeps each"
EPILOG = """\
Times are in UTC.

examples:
  kckpt ls /tmp/run
  kckpt ls /tmp/run --max-to-keep 2 --best-metric eval.loss --best-mode min
  kckpt ls /tmp/run --details          # what made each step: versions, devices, host, git, config
  kckpt ls /tmp/run --json | jq '.steps[].step'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help=_common.RUN_HELP)
  parser.add_argument(
    "--details", action="store_true", help="also what made each step (provenance: versions, devices, host, git, config)"
  )
  _common.add_retention_flags(parser)


def run(args: argparse.Namespace) -> int:
  location = _common.locate(args.run)
  listing = location.listing()
  policy = _common.retention_policy(args, location)
  rows = inspect.summary_rows(
    location.checkpoints, None if location.step is None else [location.step], retention=policy, listing=listing
  )
  if location.step is not None and not rows:
    raise CliError(f"step {location.step} is not a finished step of {location.checkpoints}")
  unfinished = list(listing.unfinished) if location.step is None else []
  if args.json:
    _format.print_json(
      {
        "checkpoints": str(location.checkpoints),
        "retention": policies.retention_rules(policy),
        "retention_from_flags": _common.retention_flags_given(args),
        "steps": [r.as_dict() for r in rows],
        "unfinished": unfinished,
      }
    )
    return _common.EXIT_OK

  total = sum(r.size_bytes or 0 for r in rows)
  print(f"{location.checkpoints}: {_format.plural(len(rows), 'step')}, {_format.human_bytes(total)}")
  if rows:
    print(_table(rows, policy))
  if args.details:
    for r in rows:
      print(f"step {r.step}: {_provenance_line(r)}")
  if unfinished:
    print(f"unfinished (being written, or left by a crash): {', '.join(unfinished)}")
  print(
    f"kept by: retention {policies.describe(policy)} ({_common.policy_source(args, location)}); -: not kept, gc would delete it"
  )
  if policy.best_metric_path:
    print(f"*: the best metric ({policy.best_mode})")
  return _common.EXIT_OK


def _provenance_line(row: inspect.StepRow) -> str:
  """One line of what made a step: ``kckpt 0.1.0, jax 0.10.2, orbax 0.12.8, 1 process, 8 gpu (H100), host a1, ...``."""
  p = row.details.provenance
  checksums = f"checksums {row.details.checksums}" if row.details.checksums else "no checksums"
  if not p:
    return f"no provenance recorded; {checksums}"
  devices = p.get("devices") or {}
  git = p.get("git")
  parts = [
    f"kckpt {p.get('kckpt')}, jax {p.get('jax')}, orbax {p.get('orbax')}, python {p.get('python')}",
    f"{p.get('process_count')} process{'es' if p.get('process_count') != 1 else ''}",
    f"{devices.get('count')} {devices.get('platform')} ({devices.get('kind')})",
    f"host {p.get('host')}",
    (f"git {str(git.get('commit'))[:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "no git"),
    checksums,
  ]
  if "config" in p:
    parts.append(f"config {_format.compact_json(p['config'])}")
  return "; ".join(parts)


def _table(rows: list[inspect.StepRow], policy: policies.RetentionPolicy) -> str:
  metrics = [r.metrics for r in rows]
  metric_names = sorted({name for m in metrics for name in m})
  tags = any(r.details.tag for r in rows)
  health = any(r.details.health is not None for r in rows)
  best = policy.best_metric_path
  headers = (
    ["step", "saved", "size", "items"]
    + [f"{m}*" if m == best else m for m in metric_names]
    + (["tag"] if tags else [])
    + (["health"] if health else [])
    + ["kept by"]
  )
  table = []
  for r, m in zip(rows, metrics, strict=True):
    reasons = r.decision.reasons if r.decision is not None else ()
    table.append(
      [str(r.step), inspect.format_time(r.details.time), _format.human_bytes(r.size_bytes), ",".join(r.details.user_items) or "-"]
      + [_format.format_number(m[name]) if name in m else "" for name in metric_names]
      + ([r.details.tag or ""] if tags else [])
      + ([r.health] if health else [])
      + [", ".join(reasons) or "-"]
    )
  right = frozenset({0, 2} | set(range(4, 4 + len(metric_names))))
  return _format.format_table(headers, table, right=right)
