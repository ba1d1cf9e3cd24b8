"""Small helpers of the read-only views: times, metrics, labels, leaf batches, reading items."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from kckpt import _fs
from kckpt import _layout
from kckpt import _orbax
from kckpt import errors
from kckpt._types import EPath, PyTree, Step
from kckpt.errors import CheckpointReadError

# Called now and then with one short line of status.
ProgressFn = Callable[[str], None]


def format_time(when: datetime.datetime | None) -> str:
  """A step's time, in UTC (a naive time is taken as UTC); ``"?"`` when unknown.

  >>> format_time(datetime.datetime(2026, 12, 1, 8, 13, 29, tzinfo=datetime.UTC))
  '2026-12-01 08:13:29 UTC'
  >>> format_time(None)
  '?'
  """
  if when is None:
    return "?"
  if when.tzinfo is not None:
    when = when.astimezone(datetime.UTC)
  return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def human_bytes(n: int | None) -> str:
  """A size for people: ``'1.5 KiB'``; None (unknown) -> ``'-'``.

  >>> human_bytes(1536), human_bytes(3 * 2**30), human_bytes(None)
  ('1.5 KiB', '3.0 GiB', '-')
  """
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


def flatten_metrics(metrics: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
  """Nested metrics as one level with dotted keys (None: no metrics).

  >>> flatten_metrics({"eval": {"loss": 1, "acc": {"top1": 0.5}}, "lr": 0.1})
  {'eval.loss': 1, 'eval.acc.top1': 0.5, 'lr': 0.1}
  >>> flatten_metrics(None)
  {}
  """
  flat: dict[str, Any] = {}
  for key, value in (metrics or {}).items():
    if isinstance(value, Mapping):
      flat.update(flatten_metrics(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def short_error(error: BaseException, limit: int = 240) -> str:
  """One line for an exception: its type and the start of its message.

  TensorStore errors carry a long JSON spec after the useful part; it is cut.

  >>> short_error(ValueError("bad shape [tensorstore_spec='{...}']\\nmore"))
  'ValueError: bad shape'
  """
  return errors.describe_read_error(error, limit)


def leaf_label(item: str, path: str) -> str:
  """How a leaf is named: ``params.w`` in the default item, ``opt/mu.w`` in others.

  >>> leaf_label("default", "params.w"), leaf_label("opt_state", "mu.w")
  ('params.w', 'opt_state/mu.w')
  """
  return path if item == _layout.DEFAULT_ITEM else f"{item}/{path}"


def spec_str(leaf: _orbax.SavedLeaf) -> str:
  """``"(4, 4) float32"``, ``"scalar int64"`` or ``"string"``.

  >>> import numpy as np
  >>> spec_str(_orbax.SavedLeaf("w", "array", (4, 4), np.dtype("float32")))
  '(4, 4) float32'
  """
  if leaf.kind == "array":
    return f"{leaf.shape} {leaf.dtype}"
  if leaf.kind == "scalar" and leaf.dtype is not None:
    return f"scalar {leaf.dtype}"
  return leaf.kind


def disk_bytes(path: EPath) -> int | None:
  """Bytes under `path` on disk; None when it cannot be read (deleted meanwhile)."""
  try:
    return _fs.folder_size(path)
  except (FileNotFoundError, OSError):
    return None


def leaf_batches(leaves: Sequence[_orbax.SavedLeaf], max_bytes: int | None = None) -> Iterator[list[_orbax.SavedLeaf]]:
  """Consecutive groups of leaves of at most `max_bytes` each (a bigger leaf alone).

  Reading one batch at a time bounds the memory a read holds. The default
  limit is the one restores use, `kckpt._orbax.RESTORE_BATCH_BYTES`.

  >>> import numpy as np
  >>> leaf = lambda path, n: _orbax.SavedLeaf(path, "array", (n,), np.dtype("uint8"))
  >>> leaves = [leaf("a", 40), leaf("b", 40), leaf("c", 40), leaf("big", 500)]
  >>> [[x.path for x in batch] for batch in leaf_batches(leaves, max_bytes=100)]
  [['a', 'b'], ['c'], ['big']]
  """
  max_bytes = _orbax.RESTORE_BATCH_BYTES if max_bytes is None else max_bytes
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


def user_items(step_path: EPath) -> dict[str, str]:
  """Item name -> ``"pytree"`` or ``"json"`` for the step at `step_path`, user items only.

  Raises:
    FileNotFoundError: the step folder is not there (any more).
  """
  return {n: f for n, f in _orbax.item_formats(step_path).items() if n not in _layout.RESERVED_ITEMS}


def open_reader(item_dir: EPath) -> _orbax.LeafReader:
  """A `LeafReader` on the pytree item at `item_dir` (`CheckpointReadError` when it has no metadata)."""
  try:
    return _orbax.LeafReader(item_dir)
  except FileNotFoundError:
    raise CheckpointReadError(f"{item_dir} has no readable pytree metadata", item=item_dir.name) from None


def read_json_item(step_path: EPath, name: str) -> Any:
  """The value of the JSON item `name` of the step at `step_path`."""
  return _orbax.read_items(step_path, [_orbax.ItemRead(name=name, format="json")])[name]


def read_pytree(
  item_dir: EPath, *, top_level_key: str | None = None, progress: ProgressFn | None = None
) -> tuple[PyTree, list[_orbax.SavedLeaf]]:
  """Reads the pytree item at `item_dir` as saved (NumPy arrays), or its `top_level_key` field.

  Returns:
    The tree and its saved leaves.
  """
  reader = open_reader(item_dir)
  prefix = "" if top_level_key is None else f"{top_level_key}."
  leaves = [leaf for path, leaf in reader.leaves.items() if top_level_key is None or path.startswith(prefix)]
  values: dict[str, Any] = {}
  for batch in leaf_batches(leaves):
    values.update(reader.read([leaf.path for leaf in batch]))
    if progress:
      progress(f"{len(values)}/{len(leaves)} leaves")
  return reader.rebuild(values, top_level_key=top_level_key), leaves


def leaf_stats(checkpoints: EPath, step: Step) -> dict[str, dict[str, dict[str, float | int]]]:
  """item -> leaf (its Orbax name) -> ``norm``, ``min``, ``max``, ``mean``, ``nonfinite``, ``size``, as saved.

  Recorded at save for every floating leaf; read from one small file, no
  array is read. {} for steps saved without (plain Orbax, older kckpt).

  >>> import tempfile, numpy as np, kckpt
  >>> with kckpt.Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=1) as ckpt:
  ...   _ = ckpt.save({"w": np.array([3.0, -4.0])}, step=1)
  >>> leaf_stats(ckpt.directory, 1)["default"]["w"]["norm"]
  5.0
  """
  raw = _orbax.read_leaf_stats(_layout.step_dir(checkpoints, step))
  return {
    item: {
      name: {key: (int(value) if key in ("nonfinite", "size") else float(value)) for key, value in stats.items()}
      for name, stats in leaves.items()
    }
    for item, leaves in raw.items()
  }
