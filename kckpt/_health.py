"""A step's health and per-leaf statistics: gathered during its save, written into it before the commit.

At `save` (`start`): a `StatsCollector` is opened for the step; the NumPy and
Python float leaves are reduced at once (they are on the host already), the
`jax.Array` leaves by the array hook while Orbax writes them, from the host
copy of their shards that Orbax makes anyway (`kckpt._orbax._checksums`), in
Orbax's background threads. Just before the commit, on the primary process
(`finish`): the partials of every process are merged into per-leaf
statistics (norm, min, max, mean, non-finite count, size), and the step is
healthy when no floating leaf holds NaN or infinity and the `health_fn` (if
any) said so. Both are written into the step folder (`HEALTH_FILE`,
`LEAF_STATS_FILE`), with the CRC32C of every saved shard (`CHECKSUMS_FILE`,
computed by the same hook), so they are part of the step, atomically.

Why not on the device: reducing each leaf with XLA means compiling one
program per distinct array shape; on the CPU that measured about 0.2 s per
shape (46 s for 200 shapes), which a state of thousands of leaves cannot pay
at its first save.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from kckpt import _fs
from kckpt import _orbax
from kckpt import multihost
from kckpt import trees

# At most this many leaves are named in a health record (the count is always there).
MAX_NAMED_LEAVES = 50


def _saved_as_array(leaf: Any) -> bool:
  """Whether Orbax writes `leaf` through its array handler (and the hook sees it), on every process.

  In a multi-process run a `jax.Array` held by one process (a counter on one
  device) is written from NumPy by the primary (`_orbax._writer`), like the
  NumPy leaves.
  """
  return isinstance(leaf, jax.Array) and not (multihost.process_count() > 1 and leaf.is_fully_addressable)


def start(
  checkpoints: epath.Path,
  step: int,
  writes: Sequence[_orbax.ItemWrite],
  *,
  primary: bool,
  on_complete: Callable[[Any], None] | None,
  checksums: bool = False,
) -> Any:
  """Opens the step's statistics; on the `primary` process, adds those of its host leaves.

  Host leaves (NumPy arrays and scalars, Python floats, and in a multi-process
  run `jax.Array`s held by one process) hold the same value on every process
  and are written once, by the primary: only it reduces them (on the calling
  thread; they are small in a training state). `on_complete(collector)` is
  called once the hook saw every `jax.Array` leaf (not when there are none).
  With `checksums`, host arrays get the CRC32C of their bytes too (scalars
  get none).
  """
  pytrees = [w for w in writes if w.format == "pytree"]
  flat = {w.name: trees.flatten_with_paths(w.value) for w in pytrees}
  arrays = sum(1 for leaves in flat.values() for leaf in leaves.values() if _saved_as_array(leaf))
  collector = _orbax.open_collector(checkpoints, step, arrays, on_complete=on_complete if arrays else None)
  if primary:
    for item, leaves in flat.items():
      for name, leaf in leaves.items():
        if _saved_as_array(leaf):
          continue
        if isinstance(leaf, (np.ndarray, np.generic, float, jax.Array)) and not isinstance(leaf, bool):
          value = np.asarray(leaf)
          sums = None
          if checksums and isinstance(leaf, (np.ndarray, jax.Array)):
            sums = _orbax.leaf_checksums(value.shape, [(tuple((0, int(n)) for n in value.shape), value)])
          collector.add(item, name, _orbax.reduce_shards([value]), array=False, checksums=sums)
  return collector


def _json_number(value: float | int) -> float | int | str:
  """JSON has no NaN or infinity: they are written as strings ("nan", "inf", "-inf")."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def shared(collector: Any) -> dict[str, Any]:
  """What a non-primary process hands the primary of one save (`finish`'s `others`): statistics and checksums."""
  return {"stats": collector.partials(), "checksums": collector.checksums()}


def finish(
  tmp: epath.Path, collector: Any, others: Iterable[Mapping[str, Any]], metrics_healthy: bool | None, *, checksums: bool = False
) -> dict[str, Any]:
  """Writes the step's health record, leaf statistics and (with `checksums`) checksums into its temporary folder `tmp`.

  `others`: what the other processes `shared`. Returns the health record.
  """
  others = list(others)
  merged = _orbax.merge_partials([collector.partials(), *(o.get("stats", {}) for o in others)])
  stats = {
    item: {name: {k: _json_number(v) for k, v in _orbax.leaf_stats(part).items()} for name, part in sorted(leaves.items())}
    for item, leaves in sorted(merged.items())
  }
  nonfinite = [f"{item}/{name}" for item, leaves in stats.items() for name, s in leaves.items() if s["nonfinite"]]
  record = {
    "healthy": not nonfinite and metrics_healthy is not False,
    "nonfinite_leaf_count": len(nonfinite),
    "nonfinite_leaves": nonfinite[:MAX_NAMED_LEAVES],
    "health_fn": metrics_healthy,
    "statistics_from_processes": 1 + len(others),
  }
  _fs.write_text_atomic(tmp / _orbax.LEAF_STATS_FILE, json.dumps(stats))
  if checksums:
    sums = _orbax.merge_checksums([collector.checksums(), *(o.get("checksums", {}) for o in others)])
    _fs.write_text_atomic(tmp / _orbax.CHECKSUMS_FILE, json.dumps(sums, separators=(",", ":")))
  # The step's size, for listings (`kckpt ls`) that would otherwise walk every step's folder:
  # its files as committed, less a few hundred bytes of small metadata written after this point.
  record["disk_bytes"] = _fs.folder_size(tmp)
  _fs.write_text_atomic(tmp / _orbax.HEALTH_FILE, json.dumps(record))
  return record


def stat_value(value: Any) -> float:
  """A statistic as read back from the step (the strings "nan", "inf", "-inf" as floats)."""
  return float(value)
