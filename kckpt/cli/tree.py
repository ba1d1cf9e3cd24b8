"""``kckpt tree RUN``: the saved tree of a step (path, shape, dtype, bytes), from metadata alone."""

from __future__ import annotations

import argparse

from kckpt import inspect
from kckpt.cli import _common
from kckpt.cli import _format
from kckpt.errors import CliError

SUMMARY = "show the saved tree of a step: path, shape, dtype, bytes (metadata only, no array read)"
EPILOG = """\
examples:
  kckpt tree /tmp/run                 # the newest step
  kckpt tree /tmp/run --step 1000 --item params
  kckpt tree /tmp/run --step best     # the best step by the run's retention rules
  kckpt tree /tmp/run --stats         # norm, min, max, mean, non-finite count of each float leaf
  kckpt tree /tmp/run/checkpoints/ckpt_1000 --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help=_common.RUN_HELP)
  parser.add_argument("--step", type=_common.parse_step_arg, help=f"the step (default: the newest): {_common.STEP_HELP}")
  parser.add_argument("--item", help="only this item (e.g. params)")
  parser.add_argument(
    "--stats",
    action="store_true",
    help="also the statistics recorded at save for each floating leaf (norm, min, max, mean, non-finite count)",
  )


def run(args: argparse.Namespace) -> int:
  location = _common.locate(args.run)
  step = _common.resolve_step(location, args.step, args)
  step_path = location.step_path(step)
  items = _common.step_items(step_path)
  if args.item is not None:
    if args.item not in items:
      raise CliError(f"step {step} has no item {args.item!r} (it has: {', '.join(sorted(items)) or 'none'})")
    items = {args.item: items[args.item]}
  trees = [inspect.item_tree(step_path, name, fmt) for name, fmt in items.items()]
  stats = inspect.leaf_stats(location.checkpoints, step) if args.stats else {}
  n_leaves = sum(len(t.leaves) for t in trees)
  n_bytes = sum(t.nbytes for t in trees)
  disk = sum(t.disk_bytes or 0 for t in trees)
  if args.json:
    _format.print_json(
      {
        "checkpoints": str(location.checkpoints),
        "step": step,
        "items": [t.as_dict() for t in trees],
        **({"leaf_stats": {t.item: stats.get(t.item, {}) for t in trees}} if args.stats else {}),
        "leaves": n_leaves,
        "bytes": n_bytes,
        "disk_bytes": disk,
      }
    )
    return _common.EXIT_OK
  print(f"step {step} of {location.checkpoints}")
  rows = []
  stat_names = ("norm", "min", "max", "mean", "nonfinite")
  for t in trees:
    if t.format == "json":
      rows.append([inspect.leaf_label(t.item, "<json>"), "-", "json", _format.human_bytes(t.disk_bytes)] + [""] * args.stats * 5)
      continue
    for leaf in t.leaves:
      shape = "-" if leaf.shape is None else str(tuple(leaf.shape))
      dtype = str(leaf.dtype) if leaf.dtype is not None else leaf.kind
      row = [inspect.leaf_label(t.item, leaf.path), shape, dtype, _format.human_bytes(leaf.nbytes)]
      if args.stats:
        numbers = stats.get(t.item, {}).get(leaf.path)
        row += [_format.format_number(numbers[k]) for k in stat_names] if numbers else [""] * 5
      rows.append(row)
  if rows:
    headers = ["path", "shape", "dtype", "bytes"] + (list(stat_names) if args.stats else [])
    print(_format.format_table(headers, rows, right=frozenset(range(3, len(headers))) - {1, 2}))
  if args.stats and not stats:
    print("no statistics: the step was saved without them (by plain Orbax or an older kckpt)")
  print(
    f"total: {n_leaves} lea{'f' if n_leaves == 1 else 'ves'}, {_format.human_bytes(n_bytes)} in memory,"
    f" {_format.human_bytes(disk)} on disk"
  )
  return _common.EXIT_OK
