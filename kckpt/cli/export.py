"""``kckpt export RUN OUT --items NAME``: a weights-only checkpoint (or safetensors file) of some items of a step."""

from __future__ import annotations

import argparse
import os
import re
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

SUMMARY = "write a weights-only checkpoint of some items of a step to a new run folder OUT (or a safetensors file)"
EPILOG = """\
NAME is an item of the step (--items params,ema_params) or, for a run that saves
one state, a top-level field of it (the params of a TrainState). OUT gets
OUT/checkpoints/ckpt_<step>/<NAME>/ (plus the step's metrics), which
kckpt.Checkpointer.open(OUT).restore(kckpt.items.Composite(params=...)) and
plain Orbax read. The exported items are held in memory while written.

--format safetensors writes one file OUT instead, its arrays named by their
dotted paths in the item (dense.w; with several items, params.dense.w), with
the step, run, items and kckpt version in its metadata. It is written a batch
of leaves at a time (about 128 MiB held), and refuses strings and two leaves
whose dotted paths are the same ({"a.b": x, "a": {"b": y}}).

examples:
  kckpt export /tmp/run --step 1000 --items params /tmp/run_weights
  kckpt export /tmp/run --step best --items params,ema_params /tmp/weights
  kckpt export /tmp/run --step 1000 --items params --format safetensors /tmp/model.safetensors"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help=_common.RUN_HELP)
  parser.add_argument("out", metavar="OUT", help="the new run folder to write")
  parser.add_argument("--step", type=_common.parse_step_arg, help=f"the step (default: the newest): {_common.STEP_HELP}")
  parser.add_argument(
    "--items", action="append", required=True, metavar="NAME[,NAME]", help="the items (or top-level fields) to export"
  )
  parser.add_argument(
    "--format",
    choices=("orbax", "safetensors"),
    default="orbax",
    help="orbax (default): a run folder OUT; safetensors: one file OUT of arrays named by dotted paths",
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
  if args.format == "safetensors":
    return _export_safetensors(args, location, step, step_path, names)
  out = epath.Path(args.out)  # epath's rename refuses to replace an OUT that appeared meanwhile
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


# -- --format safetensors ------------------------------------------------------


def _dotted(saved_path: str) -> str:
  """The real key path of a leaf saved with escaped keys: ``a\\.b.c`` (keys "a.b", "c") -> ``a.b.c``."""
  return re.sub(r"\\(.)", r"\1", saved_path)


def _export_safetensors(
  args: argparse.Namespace, location: _common.RunLocation, step: int, step_path: epath.Path, names: Sequence[str]
) -> int:
  import numpy as np  # pylint: disable=import-outside-toplevel

  from kckpt import _safetensors  # pylint: disable=import-outside-toplevel  (JAX's dtypes)

  out = epath.Path(args.out)  # epath's rename refuses to replace an OUT that appeared meanwhile
  if out.exists():
    raise CliError(f"{out} exists already; kckpt never overwrites it")
  items = _common.step_items(step_path)
  sources = export_sources(step_path, items, names)
  escaped = _orbax.escaped_items(_orbax.read_step_metadata(step_path))
  # Per exported item: its reader and (leaf, name in the file); the names checked for clashes first.
  plan: list[tuple[_orbax.LeafReader, list[tuple[_orbax.SavedLeaf, str]]]] = []
  named: dict[str, str] = {}  # name in the file -> the leaf it comes from (for messages)
  tensors: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}  # name in the file -> dtype, shape, in the file's order
  summary: list[dict[str, Any]] = []
  for name, (item, key) in sources.items():
    if items[item] == "json":
      raise CliError(f"item {item!r} of step {step} is JSON: a safetensors file holds arrays only (use --format orbax)")
    reader = inspect.open_reader(step_path / item)
    prefix = "" if key is None else f"{key}."
    chosen: list[tuple[_orbax.SavedLeaf, str]] = []
    for path, leaf in reader.leaves.items():
      if key is not None and path != key and not path.startswith(prefix):
        continue
      label = inspect.leaf_label(item, path)
      inner = path[len(prefix) :] if path != key and path != "<root>" else ""
      dotted = _dotted(inner) if item in escaped else inner
      if not dotted:  # the item (or field) is one array
        file_name = name
      else:
        file_name = f"{name}.{dotted}" if len(sources) > 1 else dotted
      if leaf.kind not in ("array", "scalar") or leaf.dtype is None or leaf.shape is None:
        raise CliError(f"{label}: a {leaf.kind} leaf; a safetensors file holds arrays only (use --format orbax)")
      if _safetensors.dtype_code(leaf.dtype) is None:
        raise CliError(f"{label}: the safetensors format has no dtype {leaf.dtype} (use --format orbax)")
      if file_name in named:
        raise CliError(
          f"{named[file_name]} and {label} would both be named {file_name!r} in the safetensors file (a key with a"
          " dot next to nested keys); use --format orbax, or keys without dots there"
        )
      named[file_name] = label
      tensors[file_name] = (leaf.dtype, leaf.shape)
      chosen.append((leaf, file_name))
    plan.append((reader, chosen))
    summary.append(
      {
        "item": name,
        "from": item if key is None else f"{item}.{key}",
        "format": "safetensors",
        "leaves": len(chosen),
        "bytes": sum(leaf.nbytes or 0 for leaf, _ in chosen),
      }
    )
  workdir = location.checkpoints.parent if location.checkpoints.name == _layout.CHECKPOINTS_FOLDER else location.checkpoints
  metadata = {
    "kckpt_step": str(step),
    "kckpt_run": str(workdir),
    "kckpt_item": ",".join(sources),
    "kckpt_version": _kckpt_version(),
  }
  tmp = out.parent / f".{out.name}.kckpt-tmp-{os.getpid()}"
  progress = _format.Progress()
  total, done = len(tensors), 0
  try:
    with tmp.open("wb") as f:
      writer = _safetensors.FileWriter(f, tensors, metadata)
      for reader, chosen in plan:
        file_names = {leaf.path: file_name for leaf, file_name in chosen}
        for batch in inspect.leaf_batches([leaf for leaf, _ in chosen]):
          values = reader.read([leaf.path for leaf in batch])
          for leaf in batch:
            writer.write(file_names[leaf.path], np.asarray(values[leaf.path], dtype=leaf.dtype))
          done += len(batch)
          progress.update(f"export: {done}/{total} leaves")
      writer.close()
    tmp.rename(out)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  finally:
    progress.clear()
  if args.json:
    _format.print_json(
      {"source": str(step_path), "out": str(out), "step": step, "path": str(out), "format": "safetensors", "items": summary}
    )
    return _common.EXIT_OK
  for s in summary:
    print(f"exported {s['item']} (from {s['from']}): {s['leaves']} leaves, {_format.human_bytes(s['bytes'])}")
  print(f"wrote step {step} to {out}")
  return _common.EXIT_OK


def _kckpt_version() -> str:
  import kckpt  # pylint: disable=import-outside-toplevel

  return kckpt.__version__
