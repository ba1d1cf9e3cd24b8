"""Save and restore speed: kckpt's defaults vs a raw Orbax `CheckpointManager`, and the disk.

Everything runs in one process and one run, on the same states, alternating
kckpt and Orbax (and which of them goes first):

- **realistic** (first): `benchmarks.realistic` on train states with an
  optimizer (GPT-2 small, a deep model of 9000 small leaves, bfloat16
  parameters with a float32 optimizer), next to Orbax's defaults, Orbax with
  compression off, plain files and (``--kauldron-python``) Kauldron;
- **sync**: save (until durable) and restore throughput of float32 states of
  64 MiB, 512 MiB and 2 GiB, each as *many* leaves (1 MiB each) and as a *few*
  large leaves (4), plus a 512 MiB bfloat16 state of many leaves;
- **async**: on the same states, how long `save` blocks the caller, and the
  time until the step is durable (`wait_until_finished` right after);
- **tiny**: a state of a few small arrays, saved again and again with
  `max_to_keep=3`: the cost of one save (sync, and async save + wait);
- **sweep**: kckpt with each candidate `StorageOptions` (compression, OCDBT,
  Zarr version, concurrency limits) on the 512 MiB states: the data behind
  kckpt's defaults;
- **disk**: write + fsync and read of the same number of bytes with plain
  file I/O, for reference.

kckpt is a `kckpt.Checkpointer` with its defaults (`save_interval_steps=1`,
`max_to_keep=None` so that nothing is deleted inside a timed save); Orbax is
`CheckpointManager(dir, CheckpointManagerOptions(enable_async_checkpointing=...))`
with `StandardSave` / `StandardRestore`, its defaults otherwise. Restores read
into `jax.ShapeDtypeStruct` targets (arrays on the CPU device) after the
step's files were dropped from the page cache (``posix_fadvise DONTNEED``;
``--warm`` keeps them cached). Each figure is the median of `--repeats` runs
(`--big-repeats` for states of 1 GiB and more), with the min-max spread.

    python -m benchmarks.run                    # the full run (about 45 min, peak RSS about 9 GB)
    python -m benchmarks.run --kauldron-python .venv-kauldron/bin/python   # with Kauldron (benchmarks/kauldron_venv.sh)
    python -m benchmarks.run --quick            # small sizes, a smoke run
    python -m benchmarks.run --sizes-mb 512 --no-sweep --json out.json
    python -m benchmarks.run --print out.json   # the tables again, from a JSON report
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import kckpt  # noqa: E402
from benchmarks import realistic  # noqa: E402
from benchmarks.pagecache import evict  # noqa: E402

MiB = 2**20
MANY_LEAF_BYTES = 1 * MiB
MIN_MANY_LEAVES = 8
FEW_LEAVES = 4

# The goals of issue 7, on 512 MiB float32 states.
GOAL_SAVE_SPEEDUP = 2.0
GOAL_RESTORE_SPEEDUP = 1.5
GOAL_ASYNC_BLOCKED_FRACTION = 0.02

SWEEP_OPTIONS: dict[str, kckpt.StorageOptions] = {
  "zstd, OCDBT, zarr2 (Orbax's format)": kckpt.StorageOptions.orbax_defaults(),
  "none, OCDBT, zarr2": kckpt.StorageOptions(compression=False, use_ocdbt=True, use_zarr3=False, checksums=False),
  "none, OCDBT, zarr3, CRC32C per shard (kckpt)": kckpt.StorageOptions(compression=False, use_ocdbt=True, use_zarr3=True),
  "none, OCDBT, zarr2 + CRC32C per shard": kckpt.StorageOptions(compression=False, use_ocdbt=True, use_zarr3=False),
  "none, OCDBT, zarr3, no checksums": kckpt.StorageOptions(compression=False, use_ocdbt=True, use_zarr3=True, checksums=False),
  "none, no OCDBT, zarr2, no checks": kckpt.StorageOptions(compression=False, use_ocdbt=False, use_zarr3=False, checksums=False),
  "none, no OCDBT, zarr3": kckpt.StorageOptions(compression=False, use_ocdbt=False, use_zarr3=True),
  "zstd, OCDBT, zarr3": kckpt.StorageOptions(compression=True, use_ocdbt=True, use_zarr3=True),
  "kckpt defaults, concurrency 0.25 GB": kckpt.StorageOptions(save_concurrent_gb=0.25, restore_concurrent_gb=0.25),
}


# ---------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  total_bytes: int
  layout: str  # "many" | "few"
  dtype: str = "float32"

  @property
  def num_leaves(self) -> int:
    if self.layout == "few":
      return FEW_LEAVES
    return max(MIN_MANY_LEAVES, self.total_bytes // MANY_LEAF_BYTES)

  @property
  def name(self) -> str:
    return f"{_size_str(self.total_bytes)} {self.dtype}, {self.num_leaves} leaves"


def _size_str(nbytes: int) -> str:
  if nbytes >= 2**30 and nbytes % 2**30 == 0:
    return f"{nbytes // 2**30} GiB"
  if nbytes >= MiB:
    return f"{nbytes / MiB:g} MiB"
  return f"{nbytes / 1024:g} KiB"


def make_state(case: Case, seed: int = 0) -> dict[str, jax.Array]:
  """Random normal weights (as incompressible as trained ones), as arrays on the CPU device."""
  dtype = jnp.dtype(case.dtype)
  rng = np.random.default_rng(seed)
  n = case.num_leaves
  per_leaf = case.total_bytes // n // dtype.itemsize
  state = {}
  for i in range(n):
    values = rng.standard_normal(per_leaf, dtype=np.float32) * np.float32(0.02)
    if dtype != np.float32:
      values = values.astype(dtype)
    if per_leaf % 1024 == 0 and per_leaf >= 1024:
      values = values.reshape(per_leaf // 1024, 1024)
    state[f"layer_{i:05d}"] = jax.device_put(values)
    del values
  return state


def abstract_of(state: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def tiny_state() -> dict[str, Any]:
  return {
    "w": jnp.ones((8, 8), jnp.float32),
    "b": jnp.zeros(8, jnp.float32),
    "step": jnp.asarray(7, jnp.int32),
    "ema": np.arange(4, dtype=np.float32),
  }


# ---------------------------------------------------------------------------
# The page cache
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The systems under test
# ---------------------------------------------------------------------------


class System:
  """One way of saving: a synchronous and an asynchronous writer on their own folders."""

  name: str
  root: Path

  def save(self, state: Any, step: int) -> None: ...
  def restore(self, abstract: Any, step: int) -> Any: ...
  def save_async(self, state: Any, step: int) -> None: ...
  def wait(self) -> None: ...
  def delete(self, step: int) -> None: ...
  def close(self) -> None: ...


class KckptSystem(System):
  def __init__(self, name: str, root: Path, storage: kckpt.StorageOptions | None = None, max_to_keep: int | None = None):
    self.name, self.root = name, root
    extra = {} if storage is None else {"storage": storage}
    common = dict(save_interval_steps=1, max_to_keep=max_to_keep, **extra)
    self.sync = kckpt.Checkpointer(workdir=root / "sync", async_save=False, **common)
    self.async_ = kckpt.Checkpointer(workdir=root / "async", async_save=True, **common)

  def save(self, state, step):
    self.sync.save(state, step=step)

  def restore(self, abstract, step):
    return self.sync.restore(abstract, step=step, donate=False)

  def save_async(self, state, step):
    self.async_.save(state, step=step)

  def wait(self):
    self.async_.wait_until_finished()

  def delete(self, step):
    for ckpt in (self.sync, self.async_):
      if step in ckpt.all_steps:
        ckpt.delete(step)

  def close(self):
    self.sync.close()
    self.async_.close()


class OrbaxSystem(System):
  def __init__(self, name: str, root: Path, max_to_keep: int | None = None):
    self.name, self.root = name, root

    def manager(folder: str, enable_async: bool) -> ocp.CheckpointManager:
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=enable_async, max_to_keep=max_to_keep)
      return ocp.CheckpointManager(root / folder, options=options)

    self.sync = manager("sync", False)
    self.async_ = manager("async", True)

  def save(self, state, step):
    self.sync.save(step, args=ocp.args.StandardSave(state))

  def restore(self, abstract, step):
    return self.sync.restore(step, args=ocp.args.StandardRestore(abstract))

  def save_async(self, state, step):
    self.async_.save(step, args=ocp.args.StandardSave(state))

  def wait(self):
    self.async_.wait_until_finished()

  def delete(self, step):
    for manager in (self.sync, self.async_):
      if step in manager.all_steps():
        manager.delete(step)

  def close(self):
    self.sync.close()
    self.async_.close()


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


class Steps:
  """Increasing step numbers shared by every system (Orbax refuses to go back)."""

  def __init__(self):
    self._next = 0

  def __call__(self) -> int:
    self._next += 1
    return self._next


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def warm_up(systems: Sequence[System], steps: Steps) -> None:
  """One small save, restore and async save each, so that no timed call pays first-use costs."""
  state = {"a": jnp.ones((256, 256)), "b": jnp.zeros(1024)}
  for system in systems:
    step = steps()
    system.save(state, step)
    jax.block_until_ready(system.restore(abstract_of(state), step))
    system.delete(step)
    step = steps()
    system.save_async(state, step)
    system.wait()
    system.delete(step)


def measure_case(
  case: Case,
  systems: Sequence[System],
  steps: Steps,
  *,
  repeats: int,
  with_async: bool,
  evict_before_restore: bool,
  log: Callable[[str], None],
) -> dict[str, Any]:
  """Times each system on one state; the order of the systems rotates every repeat."""
  state = make_state(case)
  abstract = abstract_of(state)
  samples: dict[str, dict[str, list[float]]] = {
    s.name: {"save_s": [], "restore_s": [], "async_blocked_s": [], "async_durable_s": []} for s in systems
  }
  for r in range(repeats):
    order = list(systems[r % len(systems) :]) + list(systems[: r % len(systems)])
    for system in order:
      got = samples[system.name]
      step = steps()
      seconds, _ = _timed(lambda: system.save(state, step))
      got["save_s"].append(seconds)
      if evict_before_restore:
        evict(system.root)
      seconds, restored = _timed(lambda: jax.block_until_ready(system.restore(abstract, step)))
      got["restore_s"].append(seconds)
      _check_restored(restored, state, system.name)
      del restored
      system.delete(step)
      gc.collect()
      if with_async:
        step = steps()
        start = time.perf_counter()
        system.save_async(state, step)
        blocked = time.perf_counter() - start
        system.wait()
        got["async_blocked_s"].append(blocked)
        got["async_durable_s"].append(time.perf_counter() - start)
        system.delete(step)
        gc.collect()
    log(f"  {case.name}: repeat {r + 1}/{repeats} done")
  state = None  # free the arrays before the next case is built
  gc.collect()
  return {
    "case": case.name,
    "bytes": case.total_bytes,
    "dtype": case.dtype,
    "layout": case.layout,
    "leaves": case.num_leaves,
    "repeats": repeats,
    "samples": samples,
    "summary": {name: _summarise(got, case.total_bytes) for name, got in samples.items()},
  }


def _check_restored(restored: Any, state: Any, who: str) -> None:
  """A cheap check that a restore returned the saved values (first and last leaf)."""
  leaves, expected = jax.tree.leaves(restored), jax.tree.leaves(state)
  for i in (0, len(leaves) - 1):
    if not np.array_equal(np.asarray(leaves[i]), np.asarray(expected[i])):
      raise AssertionError(f"{who} restored different values")


def _stats(values: Sequence[float]) -> dict[str, float] | None:
  if not values:
    return None
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rates(seconds: dict[str, float], nbytes: int) -> dict[str, float]:
  """MB/s (10^6 bytes/s) from the stats of durations: the slowest run gives the min."""
  return {"median": nbytes / seconds["median"] / 1e6, "min": nbytes / seconds["max"] / 1e6, "max": nbytes / seconds["min"] / 1e6}


def _summarise(got: dict[str, list[float]], nbytes: int) -> dict[str, Any]:
  out: dict[str, Any] = {key: _stats(values) for key, values in got.items()}
  for key in ("save", "restore"):
    if out[f"{key}_s"]:
      out[f"{key}_mb_per_s"] = _rates(out[f"{key}_s"], nbytes)
  return out


def measure_tiny(kckpt_sys: System, orbax_sys: System, steps: Steps, *, saves: int) -> dict[str, Any]:
  """Per-save cost of a tiny state, alternating the two systems save by save."""
  state = tiny_state()
  samples = {s.name: {"sync_s": [], "async_s": [], "async_blocked_s": []} for s in (kckpt_sys, orbax_sys)}
  for i in range(saves):
    pair = (kckpt_sys, orbax_sys) if i % 2 == 0 else (orbax_sys, kckpt_sys)
    for system in pair:
      step = steps()
      seconds, _ = _timed(lambda: system.save(state, step))
      samples[system.name]["sync_s"].append(seconds)
      step = steps()
      start = time.perf_counter()
      system.save_async(state, step)
      samples[system.name]["async_blocked_s"].append(time.perf_counter() - start)
      system.wait()
      samples[system.name]["async_s"].append(time.perf_counter() - start)
  return {
    "saves": saves,
    "leaves": len(jax.tree.leaves(state)),
    "samples": samples,
    "summary": {name: {k: _stats(v) for k, v in got.items()} for name, got in samples.items()},
  }


def measure_disk(root: Path, nbytes: int, *, repeats: int) -> dict[str, Any]:
  """Plain file I/O: write + fsync with 1 and 2 streams, read after eviction and from the page cache."""
  chunk = np.random.default_rng(1).integers(0, 255, size=8 * MiB, dtype=np.uint8).tobytes()
  folder = root / "disk"
  folder.mkdir(parents=True, exist_ok=True)

  def write(path: Path, size: int) -> None:
    with open(path, "wb", buffering=0) as f:
      left = size
      while left > 0:
        left -= f.write(chunk[: min(len(chunk), left)])
      os.fsync(f.fileno())

  def read(path: Path) -> None:
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
      while f.readinto(buf):
        pass

  keys = ("write_fsync_1_stream_s", "write_fsync_2_streams_s", "read_cold_s", "read_cached_s")
  samples: dict[str, list[float]] = {key: [] for key in keys}
  for _ in range(repeats):
    path = folder / "data.bin"
    seconds, _ = _timed(lambda: write(path, nbytes))
    samples["write_fsync_1_stream_s"].append(seconds)
    evict(folder)
    samples["read_cold_s"].append(_timed(lambda: read(path))[0])
    samples["read_cached_s"].append(_timed(lambda: read(path))[0])
    path.unlink()
    halves = [folder / "half_0.bin", folder / "half_1.bin"]
    threads = [threading.Thread(target=write, args=(p, nbytes // 2)) for p in halves]
    start = time.perf_counter()
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    samples["write_fsync_2_streams_s"].append(time.perf_counter() - start)
    for p in halves:
      p.unlink()
  shutil.rmtree(folder)
  summary = {}
  for key, values in samples.items():
    s = _stats(values)
    summary[key[: -len("_s")] + "_mb_per_s"] = _rates(s, nbytes)
  return {"bytes": nbytes, "repeats": repeats, "samples": samples, "summary": summary}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _rate(summary: dict[str, Any], key: str) -> str:
  s = summary.get(f"{key}_mb_per_s")
  if not s:
    return "-"
  return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def _speedup(base: dict[str, Any], new: dict[str, Any], key: str) -> float | None:
  b, n = base.get(f"{key}_s"), new.get(f"{key}_s")
  if not b or not n:
    return None
  return b["median"] / n["median"]


def _fmt_x(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def print_sync_table(rows: Sequence[dict[str, Any]], a: str, b: str, title: str) -> None:
  print(f"\n{title} (MB/s = 10^6 bytes/s: median (min-max); speedup = {b} time / {a} time)")
  header = (
    f"{'state':<28} | {a + ' save':>22} {b + ' save':>22} {'speedup':>8} |"
    f" {a + ' restore':>22} {b + ' restore':>22} {'speedup':>8}"
  )
  print(header)
  print("-" * len(header))
  for row in rows:
    sa, sb = row["summary"][a], row["summary"][b]
    print(
      f"{row['case']:<28} | {_rate(sa, 'save'):>22} {_rate(sb, 'save'):>22} {_fmt_x(_speedup(sb, sa, 'save')):>8} |"
      f" {_rate(sa, 'restore'):>22} {_rate(sb, 'restore'):>22} {_fmt_x(_speedup(sb, sa, 'restore')):>8}"
    )


def print_async_table(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
  print("\nAsync save: caller blocked (ms, median (min-max)), as % of the same system's sync save; time to durable (s)")
  header = f"{'state':<28} | " + " | ".join(f"{n + ' blocked':>24} {'%sync':>6} {'durable':>8}" for n in names)
  print(header)
  print("-" * len(header))
  for row in rows:
    cells = []
    for n in names:
      s = row["summary"][n]
      blocked, durable, sync = s["async_blocked_s"], s["async_durable_s"], s["save_s"]
      cells.append(
        f"{blocked['median'] * 1e3:>10.1f} ({blocked['min'] * 1e3:.1f}-{blocked['max'] * 1e3:.1f})".rjust(24)
        + f" {100 * blocked['median'] / sync['median']:>5.1f}% {durable['median']:>7.2f}s"
      )
    print(f"{row['case']:<28} | " + " | ".join(cells))


def print_tiny(tiny: dict[str, Any], a: str, b: str) -> None:
  sa, sb = tiny["summary"][a], tiny["summary"][b]
  print(f"\nTiny state ({tiny['leaves']} leaves, {tiny['saves']} saves each, max_to_keep=3): ms per save, median (min-max)")
  for key, label in (("sync_s", "sync save"), ("async_s", "async save + wait"), ("async_blocked_s", "async blocked")):
    fa, fb = sa[key], sb[key]
    print(
      f"  {label:<18} {a}: {fa['median'] * 1e3:6.1f} ({fa['min'] * 1e3:.1f}-{fa['max'] * 1e3:.1f})"
      f"   {b}: {fb['median'] * 1e3:6.1f} ({fb['min'] * 1e3:.1f}-{fb['max'] * 1e3:.1f})"
      f"   {a}/{b}: {fa['median'] / fb['median']:.2f}"
    )


def print_disk(disk: dict[str, Any]) -> None:
  s = disk["summary"]
  print(f"\nDisk ({_size_str(disk['bytes'])}, plain file I/O): MB/s median (min-max)")
  for key, label in (
    ("write_fsync_1_stream_mb_per_s", "write + fsync, 1 stream"),
    ("write_fsync_2_streams_mb_per_s", "write + fsync, 2 streams"),
    ("read_cold_mb_per_s", "read, evicted from cache"),
    ("read_cached_mb_per_s", "read, page cache"),
  ):
    v = s[key]
    print(f"  {label:<26} {v['median']:8.0f} ({v['min']:.0f}-{v['max']:.0f})")


def goals(rows: Sequence[dict[str, Any]], tiny: dict[str, Any] | None, goal_bytes: int) -> list[dict[str, Any]]:
  """The issue's goals, on the float32 states of `goal_bytes` (512 MiB in a full run)."""
  out = []
  for row in rows:
    if row["bytes"] != goal_bytes or row["dtype"] != "float32":
      continue
    k, o = row["summary"]["kckpt"], row["summary"]["orbax"]
    save_x, restore_x = _speedup(o, k, "save"), _speedup(o, k, "restore")
    out.append(_goal(f"save >= {GOAL_SAVE_SPEEDUP}x Orbax", row["case"], save_x, save_x >= GOAL_SAVE_SPEEDUP))
    out.append(_goal(f"restore >= {GOAL_RESTORE_SPEEDUP}x Orbax", row["case"], restore_x, restore_x >= GOAL_RESTORE_SPEEDUP))
    if k["async_blocked_s"]:
      frac = k["async_blocked_s"]["median"] / k["save_s"]["median"]
      label = f"async blocked <= {GOAL_ASYNC_BLOCKED_FRACTION:.0%} of a sync save"
      out.append(_goal(label, row["case"], frac, frac <= GOAL_ASYNC_BLOCKED_FRACTION))
  if tiny is not None:
    k, o = tiny["summary"]["kckpt"], tiny["summary"]["orbax"]
    for key, label in (("sync_s", "sync"), ("async_s", "async save + wait")):
      ratio = k[key]["median"] / o[key]["median"]
      out.append(_goal(f"tiny {label} no slower than Orbax", "tiny", ratio, ratio <= 1.0))
  return out


def _goal(goal: str, state: str, value: float, met: bool) -> dict[str, Any]:
  return {"goal": goal, "state": state, "value": value, "met": met}


def print_goals(results: list[dict[str, Any]]) -> None:
  if not results:
    return
  print("\nGoals")
  for g in results:
    value = f"{g['value']:.1%}" if "%" in g["goal"] else f"{g['value']:.2f}"
    print(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']:<44} {g['state']:<28} {value}")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
  parser.add_argument("--sizes-mb", type=float, nargs="+", default=None, help="float32 state sizes in MiB (default 64 512 2048)")
  parser.add_argument("--layouts", nargs="+", choices=["many", "few"], default=["many", "few"])
  parser.add_argument("--bf16-mb", type=float, default=None, help="size of the bfloat16 state in MiB (0: none; default 512)")
  parser.add_argument("--repeats", type=int, default=None, help="repeats per state (default 5)")
  parser.add_argument("--big-repeats", type=int, default=None, help="repeats for states of 1 GiB and more (default 3)")
  parser.add_argument("--tiny-saves", type=int, default=None, help="saves of the tiny state per system and mode (default 40)")
  parser.add_argument("--sweep-mb", type=float, default=None, help="state size of the storage-options sweep (default 512)")
  parser.add_argument("--no-sweep", action="store_true", help="skip the storage-options sweep")
  parser.add_argument("--no-async", action="store_true", help="skip async saves")
  parser.add_argument("--disk-mb", type=float, default=None, help="bytes of the disk reference (default: 512 MiB)")
  parser.add_argument("--warm", action="store_true", help="restore from the page cache (no eviction)")
  parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
  parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
  parser.add_argument("--quiet", action="store_true", help="no progress lines")
  parser.add_argument("--no-realistic", action="store_true", help="skip the realistic train states")
  parser.add_argument("--realistic-rounds", type=int, default=None, help="rounds per realistic state (default 3)")
  parser.add_argument("--realistic-scale", type=float, default=None, help="shrink the realistic states (default 1)")
  parser.add_argument("--deep-leaves", type=int, default=None, help="parameter leaves of the deep state (default 3000)")
  parser.add_argument("--kauldron-python", default=None, help="python of a side venv with Kauldron (benchmarks/kauldron_venv.sh)")
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = {
    "sizes_mb": [16, 64] if quick else [64, 512, 2048],
    "bf16_mb": 16 if quick else 512,
    "repeats": 2 if quick else 5,
    "big_repeats": 2 if quick else 3,
    "tiny_saves": 6 if quick else 40,
    "sweep_mb": 16 if quick else 512,
    "disk_mb": 64 if quick else 512,
    "realistic_rounds": 1 if quick else 3,
    "realistic_scale": 0.05 if quick else 1.0,
    "deep_leaves": 200 if quick else 3000,
  }
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def _machine() -> dict[str, Any]:
  info: dict[str, Any] = {
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "orbax_checkpoint": ocp.__version__ if hasattr(ocp, "__version__") else None,
    "kckpt": kckpt.__version__,
    "platform": platform.platform(),
  }
  try:
    info["load_average_at_start"] = os.getloadavg()
  except OSError:
    pass
  return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parse(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's per-save warnings and info lines

  def log(msg: str) -> None:
    if not args.quiet:
      print(msg, file=sys.stderr, flush=True)

  report: dict[str, Any] = {"benchmark": "run", "machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}
  root = Path(tempfile.mkdtemp(prefix="kckpt_bench_run_", dir=args.dir))
  steps = Steps()
  started = time.perf_counter()
  systems: list[System] = []
  try:
    if not args.no_realistic:
      realistic_args = ["--rounds", str(args.realistic_rounds), "--scale", str(args.realistic_scale)]
      realistic_args += ["--deep-leaves", str(args.deep_leaves), "--dir", str(root)] + (["--quiet"] if args.quiet else [])
      if args.kauldron_python:
        realistic_args += ["--kauldron-python", args.kauldron_python]
      report["realistic"] = realistic.main(realistic_args, print_report=False)
    log(f"disk reference ({_size_str(int(args.disk_mb * MiB))}) ...")
    report["disk"] = measure_disk(root, int(args.disk_mb * MiB), repeats=args.repeats)

    kckpt_sys = KckptSystem("kckpt", root / "kckpt")
    orbax_sys = OrbaxSystem("orbax", root / "orbax")
    systems += [kckpt_sys, orbax_sys]
    warm_up([kckpt_sys, orbax_sys], steps)

    cases = [Case(int(mb * MiB), layout) for mb in args.sizes_mb for layout in args.layouts]
    if args.bf16_mb:
      cases.append(Case(int(args.bf16_mb * MiB), "many", "bfloat16"))
    rows = []
    for case in cases:
      repeats = args.big_repeats if case.total_bytes >= 2**30 else args.repeats
      log(f"{case.name}: {repeats} repeats ...")
      rows.append(
        measure_case(
          case,
          [kckpt_sys, orbax_sys],
          steps,
          repeats=repeats,
          with_async=not args.no_async,
          evict_before_restore=not args.warm,
          log=log,
        )
      )
    report["sync"] = rows

    log(f"tiny state: {args.tiny_saves} saves each ...")
    tiny_k = KckptSystem("kckpt", root / "tiny_kckpt", max_to_keep=3)
    tiny_o = OrbaxSystem("orbax", root / "tiny_orbax", max_to_keep=3)
    systems += [tiny_k, tiny_o]
    warm_up([tiny_k, tiny_o], steps)
    report["tiny"] = measure_tiny(tiny_k, tiny_o, steps, saves=args.tiny_saves)

    sweep_rows = []
    if not args.no_sweep:
      sweep_systems: list[System] = [orbax_sys, kckpt_sys]
      for i, (label, options) in enumerate(SWEEP_OPTIONS.items()):
        if options == kckpt.StorageOptions():
          continue  # kckpt's defaults are `kckpt_sys` already
        sweep_systems.append(KckptSystem(label, root / f"sweep_{i}", storage=options))
      systems += sweep_systems[2:]
      warm_up(sweep_systems[2:], steps)
      for layout in args.layouts:
        case = Case(int(args.sweep_mb * MiB), layout)
        log(f"sweep, {case.name}: {args.repeats} repeats of {len(sweep_systems)} systems ...")
        sweep_rows.append(
          measure_case(
            case,
            sweep_systems,
            steps,
            repeats=args.repeats,
            with_async=False,
            evict_before_restore=not args.warm,
            log=log,
          )
        )
    report["sweep"] = sweep_rows
  finally:
    for system in systems:
      try:
        system.close()
      except Exception as e:  # pylint: disable=broad-exception-caught
        log(f"closing {system.name}: {e}")
    shutil.rmtree(root, ignore_errors=True)

  goal_bytes = 512 * MiB if any(r["bytes"] == 512 * MiB for r in rows) else max(r["bytes"] for r in rows)
  report["goals"] = goals(rows, report["tiny"], goal_bytes)
  report["seconds"] = time.perf_counter() - started
  try:
    report["machine"]["load_average_at_end"] = os.getloadavg()
  except OSError:
    pass
  report["machine"]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  if args.json:
    args.json.write_text(json.dumps(report, indent=2, default=str))
  print_report(report)
  return report


def print_report(report: dict[str, Any]) -> None:
  """Prints the tables of a report (from `main`, or read back from its JSON)."""
  machine, rows = report["machine"], report["sync"]
  warm = report["args"].get("warm") == "True"
  print(
    f"\nkckpt {machine['kckpt']} vs Orbax {machine['orbax_checkpoint']} CheckpointManager defaults;"
    f" {machine['cpu_count']} CPUs; load average {_load(machine.get('load_average_at_start'))} at start,"
    f" {_load(machine.get('load_average_at_end'))} at end; {report['seconds']:.0f} s;"
    f" peak RSS {machine.get('peak_rss_mb', 0):.0f} MB"
  )
  if report.get("realistic"):
    print("\nRealistic train states (MB/s median (min-max); ratios from the same run):")
    realistic.print_tables(report["realistic"])
    realistic.print_goals(report["realistic"])
  print_disk(report["disk"])
  title = "Sync save (until durable) and restore (after page-cache eviction)"
  if warm:
    title = "Sync save (until durable) and restore (warm page cache)"
  print_sync_table(rows, "kckpt", "orbax", title)
  if rows and rows[0]["summary"]["kckpt"]["async_blocked_s"]:
    print_async_table(rows, ["kckpt", "orbax"])
  print_tiny(report["tiny"], "kckpt", "orbax")
  for row in report["sweep"]:
    print(f"\nStorage options on {row['case']} (kckpt with each StorageOptions; MB/s median (min-max); speedup vs Orbax)")
    base = row["summary"]["orbax"]
    for name, s in row["summary"].items():
      label = "kckpt defaults: " + _options_str(kckpt.StorageOptions()) if name == "kckpt" else name
      print(
        f"  {label:<46} save {_rate(s, 'save'):>18} {_fmt_x(_speedup(base, s, 'save')):>7}"
        f"   restore {_rate(s, 'restore'):>18} {_fmt_x(_speedup(base, s, 'restore')):>7}"
      )
  print_goals(report["goals"])


def _load(load: Any) -> str:
  return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def _options_str(options: kckpt.StorageOptions) -> str:
  compression = "zstd" if options.compression else "none"
  zarr = "zarr3" if options.use_zarr3 else "zarr2"
  checks = ", CRC32C per shard" if options.checksums else ""
  return f"{compression}, {'OCDBT' if options.use_ocdbt else 'no OCDBT'}, {zarr}{checks}"


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--print":  # python -m benchmarks.run --print out.json
    print_report(json.loads(Path(sys.argv[2]).read_text()))
  else:
    main()
