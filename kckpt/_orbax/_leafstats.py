"""Per-leaf statistics of a step, reduced from the host copies of its shards while they are written.

A `StatsCollector` is opened for each save (`open_collector`); the array hook
(`kckpt._orbax._checksums`) adds one `Partial` per array and process, kckpt
adds those of its NumPy leaves, and `leaf_stats` turns the merged partials into
the numbers stored with the step. In a multi-process run each process reduces
only the shards it writes; `StatsCollector.partials` are what it hands the
primary process, which merges them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from kckpt import _layout


@dataclasses.dataclass(frozen=True)
class Partial:
  """What a few values of one floating leaf reduce to; partials of one leaf `merge`."""

  count: int
  nonfinite: int
  total: float
  squares: float
  min: float
  max: float

  def merge(self, other: Partial) -> Partial:
    return Partial(
      count=self.count + other.count,
      nonfinite=self.nonfinite + other.nonfinite,
      total=self.total + other.total,
      squares=self.squares + other.squares,
      min=float(np.minimum(self.min, other.min)),  # NaN wins, as in np.min
      max=float(np.maximum(self.max, other.max)),
    )

  def as_list(self) -> list[Any]:
    return [self.count, self.nonfinite, self.total, self.squares, self.min, self.max]

  @classmethod
  def from_list(cls, values: list[Any]) -> Partial:
    count, nonfinite, total, squares, low, high = values
    return cls(int(count), int(nonfinite), float(total), float(squares), float(low), float(high))


def is_floating(dtype: Any) -> bool:
  """Whether leaves of `dtype` get statistics (floating and complex-free: float16/32/64, bfloat16, float8s)."""
  try:
    return np.issubdtype(np.dtype(dtype), np.floating) or np.dtype(dtype).kind == "V" and "float" in np.dtype(dtype).name
  except TypeError:
    return False


BLOCK_BYTES = 1 << 19  # a shard is reduced in blocks of 512 KiB, each while it is in a core's cache


class Reducer:
  """Reduces the values of one floating leaf, block by block, to a `Partial`.

  Each block is read four times (sum of squares, sum, min, max; the
  non-finite values are counted only when the sum of squares says there
  are any: a NaN or infinity makes it NaN or infinite), so blocks that fit
  in the cache cost one pass over memory instead of four. Sums are added up
  in float64 across blocks.

  >>> r = Reducer()
  >>> r.add(np.array([3.0, -4.0], np.float32)); r.add(np.array([np.nan], np.float32))
  >>> r.partial()
  Partial(count=3, nonfinite=1, total=nan, squares=nan, min=nan, max=nan)
  """

  __slots__ = ("count", "high", "low", "nonfinite", "squares", "total")

  def __init__(self) -> None:
    self.count = self.nonfinite = 0
    self.total = self.squares = 0.0
    self.low, self.high = math.inf, -math.inf

  def add(self, values: np.ndarray) -> None:
    """Adds a 1-D block of floating values (float32 and float64 as they are, other floats as float32)."""
    if values.dtype not in (np.float32, np.float64):
      values = values.astype(np.float32)
    squares = float(np.dot(values, values))
    if not math.isfinite(squares):
      self.nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
    self.count += int(values.size)
    self.total += float(np.add.reduce(values))
    self.squares += squares
    low, high = float(np.minimum.reduce(values)), float(np.maximum.reduce(values))
    if self.low == self.low and not low >= self.low:  # NaN wins, as in np.min
      self.low = low
    if self.high == self.high and not high <= self.high:
      self.high = high

  def partial(self) -> Partial | None:
    """What the values added reduce to (None when there were none)."""
    if not self.count:
      return None
    return Partial(self.count, self.nonfinite, self.total, self.squares, self.low, self.high)


def blocks(values: np.ndarray) -> Iterable[np.ndarray]:
  """A C-contiguous array's values, flat, in blocks of `BLOCK_BYTES` (views, no copy).

  >>> [b.tolist() for b in blocks(np.zeros((2, 3), np.float32))]
  [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
  """
  flat = values.reshape(-1)
  step = max(1, BLOCK_BYTES // max(1, flat.itemsize))
  for start in range(0, flat.size, step):
    yield flat[start : start + step]


def reduce_shards(shards: Iterable[np.ndarray]) -> Partial | None:
  """The `Partial` of some shards of one leaf (None for a leaf that is not floating, or has no values here).

  >>> reduce_shards([np.array([3.0, -4.0], np.float32)])
  Partial(count=2, nonfinite=0, total=-1.0, squares=25.0, min=-4.0, max=3.0)
  """
  reducer = Reducer()
  for shard in shards:
    shard = np.asarray(shard)
    if is_floating(shard.dtype):
      for block in blocks(np.ascontiguousarray(shard)):
        reducer.add(block)
  return reducer.partial()


def leaf_stats(partial: Partial) -> dict[str, float | int]:
  """The numbers stored for one leaf: ``norm`` (L2), ``min``, ``max``, ``mean``, ``nonfinite`` (count), ``size``.

  As NumPy computes them on the whole array: a NaN anywhere makes the norm,
  min, max and mean NaN.

  >>> leaf_stats(Partial(count=2, nonfinite=0, total=-1.0, squares=25.0, min=-4.0, max=3.0))
  {'norm': 5.0, 'min': -4.0, 'max': 3.0, 'mean': -0.5, 'nonfinite': 0, 'size': 2}
  """
  return {
    "norm": math.sqrt(partial.squares) if partial.squares >= 0 or math.isnan(partial.squares) else float("nan"),
    "min": partial.min,
    "max": partial.max,
    "mean": partial.total / partial.count if partial.count else float("nan"),
    "nonfinite": partial.nonfinite,
    "size": partial.count,
  }


class StatsCollector:
  """The partials of one save of one process, by item and Orbax parameter name."""

  def __init__(self, checkpoints: str, step: int, expected_arrays: int, on_complete: Callable[[StatsCollector], None] | None):
    self.checkpoints = checkpoints
    self.step = step
    self.expected_arrays = expected_arrays
    self._arrays = 0
    self._on_complete = on_complete
    self._lock = threading.Lock()
    self._parts: dict[tuple[str, str], Partial] = {}
    self._checksums: dict[tuple[str, str], dict[str, Any]] = {}  # `leaf_checksums` of the shards written here
    self.on_written: Callable[[int], None] | None = None  # called with each array's bytes written here (progress)

  def add(
    self,
    item: str,
    name: str,
    partial: Partial | None,
    *,
    array: bool = True,
    nbytes: int = 0,
    checksums: dict[str, Any] | None = None,
  ) -> None:
    """Adds what one array (or NumPy leaf, `array=False`) of `item` reduced to on this process.

    `checksums`: `_checksums.leaf_checksums` of the shards of it written here.
    """
    if array and self.on_written is not None:
      self.on_written(nbytes)
    complete = False
    key = (item, name)
    with self._lock:
      if partial is not None:
        self._parts[key] = partial if key not in self._parts else self._parts[key].merge(partial)
      if checksums:
        known = self._checksums.setdefault(key, {**checksums, "shards": []})
        known["shards"] = [*known["shards"], *checksums["shards"]]
      if array:
        self._arrays += 1
        complete = self._arrays == self.expected_arrays
    if complete and self._on_complete is not None:
      self._on_complete(self)

  def partials(self) -> dict[str, dict[str, list[Any]]]:
    """item -> parameter name -> the merged `Partial` as a list (JSON, for another process)."""
    out: dict[str, dict[str, list[Any]]] = {}
    with self._lock:
      for (item, name), part in self._parts.items():
        out.setdefault(item, {})[name] = part.as_list()
    return out

  def checksums(self) -> dict[str, dict[str, dict[str, Any]]]:
    """item -> parameter name -> `leaf_checksums` of the shards written here (JSON, for another process)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with self._lock:
      for (item, name), sums in self._checksums.items():
        out.setdefault(item, {})[name] = dict(sums)
    return out


def merge_checksums(tables: Iterable[Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
  """Joins `StatsCollector.checksums` of several processes, keeping the leaves whose shards tile the array.

  Each leaf's shards are sorted by box, without repeats. A leaf whose boxes
  do not cover its array exactly once (a process's part lost: a bug) is
  left out with a warning: its reads are then unchecked, never refused.
  """
  merged: dict[str, dict[str, dict[str, Any]]] = {}
  for table in tables:
    for item, leaves in table.items():
      for name, sums in leaves.items():
        known = merged.setdefault(item, {}).setdefault(name, {**sums, "shards": []})
        known["shards"] = [*known["shards"], *sums["shards"]]
  for item, leaves in merged.items():
    for name in list(leaves):
      unique = {json.dumps(entry[0]): entry for entry in leaves[name]["shards"]}  # a replicated shard: once
      leaves[name]["shards"] = [unique[key] for key in sorted(unique)]
      if not tiles(leaves[name]["shape"], [box for box, _ in leaves[name]["shards"]]):
        logging.getLogger("kckpt").warning("kckpt: the saved shards of %s/%s do not tile the array: no checksum kept", item, name)
        del leaves[name]
  return merged


def tiles(shape: Sequence[int], boxes: Sequence[Sequence[Sequence[int]]]) -> bool:
  """Whether distinct `boxes` ([start, stop) per axis) inside `shape` cover it exactly once (by volume).

  >>> tiles([4, 2], [[[0, 2], [0, 2]], [[2, 4], [0, 2]]]), tiles([4, 2], [[[0, 2], [0, 2]]])
  (True, False)
  """
  total = 0
  for box in boxes:
    if len(box) != len(shape) or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape, strict=True)):
      return False
    total += math.prod(hi - lo for lo, hi in box)
  return total == math.prod(shape)


def merge_partials(tables: Iterable[Mapping[str, Mapping[str, list[Any]]]]) -> dict[str, dict[str, Partial]]:
  """Merges `StatsCollector.partials` of several processes."""
  merged: dict[str, dict[str, Partial]] = {}
  for table in tables:
    for item, leaves in table.items():
      for name, values in leaves.items():
        part = Partial.from_list(list(values))
        known = merged.setdefault(item, {})
        known[name] = part if name not in known else known[name].merge(part)
  return merged


_lock = threading.Lock()
_collectors: dict[tuple[str, int], StatsCollector] = {}
_on_close: list[Callable[[str], None]] = []  # called with the folder prefix of a closed collector's step


def on_close(callback: Callable[[str], None]) -> None:
  """`callback("<checkpoints>/<step folder name>")` whenever a collector closes (the step's folders, tmp ones too)."""
  if callback not in _on_close:
    _on_close.append(callback)


def open_collector(
  checkpoints: epath.Path, step: int, expected_arrays: int, on_complete: Callable[[StatsCollector], None] | None = None
) -> StatsCollector:
  """Starts collecting the statistics of the save of `step` under `checkpoints` (until `close_collector`)."""
  collector = StatsCollector(checkpoints.as_posix().rstrip("/"), step, expected_arrays, on_complete)
  with _lock:
    _collectors[(collector.checkpoints, step)] = collector
  return collector


def close_collector(collector: StatsCollector) -> None:
  with _lock:
    if _collectors.get((collector.checkpoints, collector.step)) is collector:
      del _collectors[(collector.checkpoints, collector.step)]
  for callback in _on_close:
    callback(f"{collector.checkpoints}/{_layout.STEP_PREFIX}_{collector.step}")


def item_name(folder: str) -> str:
  """An item's name from its folder's name (Orbax writes an item in ``<name>.orbax-checkpoint-tmp...`` first).

  >>> item_name("params.orbax-checkpoint-tmp-1733"), item_name("params")
  ('params', 'params')
  """
  return folder.split(".orbax-checkpoint-tmp", 1)[0]


def collector_for(item_dir: str) -> StatsCollector | None:
  """The open collector of the step whose (temporary) folder holds `item_dir`, if any."""
  if not _collectors:
    return None
  step_dir = epath.Path(item_dir).parent
  step = _layout.parse_step(step_dir.name.split(".", 1)[0])
  if step is None:
    return None
  with _lock:
    return _collectors.get((step_dir.parent.as_posix().rstrip("/"), step))
