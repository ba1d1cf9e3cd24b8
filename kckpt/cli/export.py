"""``kckpt export RUN OUT --items NAME``: a weights-only checkpoint of some items of a step."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from kckpt import _layout
from kckpt import _orbax
from kckpt import inspect
from kckpt import items as items_lib
from kckpt.cli import _common
from kckpt.cli import _format
from kckpt.errors import CliError

SUMMARY = "write a weights-only checkpoint of some items of a step to a new run folder OUT"
EPILOG = """\
NAME is an item of the step (--items params,ema_params) or, for a run that saves
one state, a top-level field of it (the params of a TrainState). OUT gets
OUT/checkpoints/ckpt_<step>/<NAME>/ (plus the step's metrics), which
kckpt.Checkpointer.open(OUT).restore(kckpt.items.Composite(params=...)) and
plain Orbax read. The exported items are held in memory while written.

examples:
  kckpt export /tmp/run --step 1000 --items params /tmp/run_weights
  kckpt export /tmp/run --step best --items params,ema_params /tmp/weights"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help=_common.RUN_HELP)
  parser.add_argument("out", metavar="OUT", help="the new run folder to write")
  parser.add_argument("--step", type=_common.parse_step_arg, help=f"the step (default: the newest): {_common.STEP_HELP}")
  parser.add_argument(
    "--items", action="append", required=True, metavar="NAME[,NAME]", help="the items (or top-level fields) to export"
  )


def export_sources(step_path: epath.Path, items: Mapping[str, str], names: Sequence[str]) -> dict[str, tuple[str, str | None]]:
  """Exported name -> (item read, top-level key of it or None)."""
  sources: dict[str, tuple[str, str | None]] = {}
  default_keys: list[str] | None = None
  for name in names:
    if name in items:
      sources[name] = (name, None)
      continue
    if items.get(_layout.DEFAULT_ITEM) == "pytree":
      if default_keys is None:
        default_keys = inspect.open_reader(step_path / _layout.DEFAULT_ITEM).top_level_keys()
      if name in default_keys:
        sources[name] = (_layout.DEFAULT_ITEM, name)
        continue
    fields = f"; fields of its default item: {', '.join(default_keys)}" if default_keys else ""
    raise CliError(
      f"step {_layout.parse_step(step_path.name)} has no item {name!r} (items: {', '.join(sorted(items)) or 'none'}{fields})"
    )
  return sources


def run(args: argparse.Namespace) -> int:
  from kckpt import trees  # pylint: disable=import-outside-toplevel  (imports JAX: only when exporting)
  from kckpt.checkpointer import Checkpointer  # pylint: disable=import-outside-toplevel  (the writer, only here)

  location = _common.locate(args.run)
  step = _common.resolve_step(location, args.step, args)
  step_path = location.step_path(step)
  names = [n for group in args.items for n in group.split(",") if n]
  if not names:
    raise CliError("--items names at least one item (e.g. --items params)")
  out = epath.Path(args.out)
  if out.exists() and not out.is_dir():
    raise CliError(f"OUT exists and is not a folder: {args.out}")
  out_step = _layout.step_dir(_layout.checkpoints_dir(out), step)
  if out_step.exists():
    raise CliError(f"{out_step} exists already; kckpt never overwrites a step")
  items = _common.step_items(step_path)
  sources = export_sources(step_path, items, names)
  escaped = _orbax.escaped_items(_orbax.read_step_metadata(step_path))
  progress = _format.Progress()
  exported: dict[str, Any] = {}
  summary: list[dict[str, Any]] = []
  try:
    for name, (item, key) in sources.items():
      if items[item] == "json":
        exported[name] = items_lib.Json(inspect.read_json_item(step_path, item))
        summary.append({"item": name, "from": item, "format": "json", "leaves": 0, "bytes": 0})
        continue
      tree, leaves = inspect.read_pytree(
        step_path / item, top_level_key=key, progress=progress.callback(f"export: reading {name} ")
      )
      # Saved with escaped keys (dots next to nested keys): the writer escapes them again.
      exported[name] = trees.unescape_dotted_keys(tree) if item in escaped else tree
      summary.append(
        {
          "item": name,
          "from": item if key is None else f"{item}.{key}",
          "format": "pytree",
          "leaves": len(leaves),
          "bytes": sum(leaf.nbytes or 0 for leaf in leaves),
        }
      )
    progress.update("export: writing", force=True)
    metrics = _orbax.read_step_metrics(step_path)
    writer = Checkpointer(workdir=out, save_interval_steps=None, max_to_keep=None, async_save=False)
    try:
      writer.save(items_lib.Composite(**exported), step=step, metrics=metrics)
    finally:
      writer.close()
  finally:
    progress.clear()
  if args.json:
    _format.print_json({"source": str(step_path), "out": str(out), "step": step, "path": str(out_step), "items": summary})
    return _common.EXIT_OK
  for s in summary:
    detail = "json" if s["format"] == "json" else f"{s['leaves']} leaves, {_format.human_bytes(s['bytes'])}"
    print(f"exported {s['item']} (from {s['from']}): {detail}")
  print(f"wrote step {step} to {out_step}")
  return _common.EXIT_OK
