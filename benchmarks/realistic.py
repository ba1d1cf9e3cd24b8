"""kckpt on realistic train states, next to raw Orbax (defaults, and compression off), plain files and Kauldron.

The states are `benchmarks.states`: GPT-2 small with Adam (1.49 GB, 445
leaves), a deep model of ``--deep-leaves`` small parameter leaves with Adam
(three times as many leaves), and GPT-2 with bfloat16 parameters and a
float32 optimizer. In one process, in rounds that shuffle the order of the
systems (seeded), each system:

- saves synchronously, timed until durable (TensorStore fsyncs Orbax's
  array data, not its metadata files nor its folders: those are fsynced
  inside the timed span; before each timed save, a ``sync`` writes back
  what earlier saves left dirty);
- restores that step into `jax.ShapeDtypeStruct` targets (a training job's
  resume) and with no target (an eval job or a notebook: arrays as saved),
  each after the step's files were dropped from the page cache;
- saves asynchronously: the time the call blocked the caller, and the time
  until durable.

Each timed call starts after a pause of 3 s (`benchmarks.pagecache.settle`:
on this machine's hypervisor, a save that started right after another
system freed its memory wrote faster than one that started later). Each
sync save also records the process's CPU time (all threads) in user space
and in the kernel (mostly copying the bytes into the page cache).

The systems:

- **kckpt**: `kckpt.Checkpointer` with its defaults (Zarr v2, OCDBT, no
  compression, a CRC32C per saved shard; health, per-leaf statistics,
  provenance);
- **orbax**: an Orbax `CheckpointManager` with its defaults (`StandardSave`:
  OCDBT, Zarr v2, zstd);
- **orbax tuned**: the same manager with a `PyTreeCheckpointHandler` of
  `use_compression=False` (what a user who tunes Orbax gets);
- **files**: one raw file per leaf, fsynced (``tofile``); read back with
  ``np.fromfile`` and ``jax.device_put``: the disk's speed through NumPy;
- **kauldron** (``--kauldron-python``): Kauldron's `kd.ckpts.Checkpointer`
  in a side virtual environment (``benchmarks/kauldron_venv.sh``), run as a
  subprocess on the same state after the others, so not alternated.

Reported: medians (min-max) in MB/s (10^6 bytes per second), and ratios
against tuned Orbax and the plain files computed from the same run.

    python -m benchmarks.realistic                       # all three states, 3 rounds: about 10 min
    python -m benchmarks.realistic --states gpt2 --rounds 5 --json out.json
    python -m benchmarks.realistic --scale 0.05 --deep-leaves 200 --rounds 1   # a smoke run (the tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import kckpt
from benchmarks import states as states_lib
from benchmarks.pagecache import SETTLE_SECS
from benchmarks.pagecache import evict
from benchmarks.pagecache import flush_all
from benchmarks.pagecache import fsync
from benchmarks.pagecache import make_durable
from benchmarks.pagecache import settle

MEASURES = ("save_s", "restore_s", "restore_no_target_s", "async_blocked_s", "async_durable_s", "save_user_s", "save_kernel_s")


class System:
  """One way of saving a state: sync and async writers on folders of their own."""

  name: str
  root: Path

  def save(self, state: Any, step: int) -> None: ...
  def restore(self, abstract: Any, step: int) -> Any: ...
  def restore_no_target(self, step: int) -> Any: ...
  def save_async(self, state: Any, step: int) -> None: ...
  def wait(self) -> None: ...
  def delete(self, step: int) -> None: ...
  def close(self) -> None: ...

  def make_durable(self, step: int, *, saved_async: bool) -> None:
    """Fsyncs what the save of `step` wrote, for a system whose save returns before that (Orbax)."""


class Kckpt(System):
  def __init__(self, root: Path, name: str = "kckpt"):
    self.name, self.root = name, root
    self.sync = kckpt.Checkpointer(workdir=root / "sync", save_interval_steps=1, async_save=False)
    self.async_ = kckpt.Checkpointer(workdir=root / "async", save_interval_steps=1)

  def save(self, state, step):
    self.sync.save(state, step=step)

  def restore(self, abstract, step):
    return self.sync.restore(abstract, step=step)

  def restore_no_target(self, step):
    return self.sync.restore(step=step)

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


class Orbax(System):
  """A `CheckpointManager`: Orbax's defaults, or (``tuned``) a pytree handler without compression."""

  def __init__(self, root: Path, *, tuned: bool):
    self.name, self.root, self.tuned = ("orbax tuned" if tuned else "orbax"), root, tuned

    def manager(folder: str, enable_async: bool) -> ocp.CheckpointManager:
      options = ocp.CheckpointManagerOptions(enable_async_checkpointing=enable_async)
      handlers = ocp.PyTreeCheckpointHandler(use_compression=False) if tuned else None
      return ocp.CheckpointManager(root / folder, options=options, item_handlers=handlers)

    self.sync = manager("sync", False)
    self.async_ = manager("async", True)

  def _save_args(self, state):
    return ocp.args.PyTreeSave(state) if self.tuned else ocp.args.StandardSave(state)

  def save(self, state, step):
    self.sync.save(step, args=self._save_args(state))

  def restore(self, abstract, step):
    if self.tuned:
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
      return self.sync.restore(step, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args))
    return self.sync.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_no_target(self, step):
    return self.sync.restore(step, args=ocp.args.PyTreeRestore() if self.tuned else ocp.args.StandardRestore())

  def save_async(self, state, step):
    self.async_.save(step, args=self._save_args(state))

  def wait(self):
    self.async_.wait_until_finished()

  def delete(self, step):
    for manager in (self.sync, self.async_):
      if step in manager.all_steps():
        manager.delete(step)

  def close(self):
    self.sync.close()
    self.async_.close()

  def make_durable(self, step, *, saved_async):
    make_durable(self.root / ("async" if saved_async else "sync") / str(step))


class Files(System):
  """One raw file per leaf and a JSON manifest of shapes and dtypes, all fsynced; read with ``np.fromfile``.

  Into a target, each array is placed with ``jax.device_put``; with no
  target, the arrays are NumPy, shaped by the manifest.
  """

  def __init__(self, root: Path):
    self.name, self.root = "files", root
    self._treedef: Any = None
    root.mkdir(parents=True)

  def _folder(self, step: int) -> Path:
    return self.root / str(step)

  def save(self, state, step):
    folder = self._folder(step)
    folder.mkdir()
    leaves, self._treedef = jax.tree.flatten(state)
    with open(folder / "manifest.json", "w") as f:
      f.write(json.dumps([[list(x.shape), str(x.dtype)] for x in leaves]))
      f.flush()
      os.fsync(f.fileno())
    for i, leaf in enumerate(leaves):
      path = folder / str(i)
      with open(path, "wb") as f:
        np.asarray(leaf).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    for durable in (folder, self.root):  # the files' names, then the step folder's
      fsync(str(durable))

  def restore(self, abstract, step):
    leaves, treedef = jax.tree.flatten(abstract)
    folder = self._folder(step)
    out = [
      jax.device_put(np.fromfile(folder / str(i), dtype=leaf.dtype).reshape(leaf.shape), leaf.sharding)
      for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)

  def restore_no_target(self, step):
    folder = self._folder(step)
    specs = json.loads((folder / "manifest.json").read_text())
    out = [np.fromfile(folder / str(i), dtype=jax.numpy.dtype(dtype)).reshape(shape) for i, (shape, dtype) in enumerate(specs)]
    return jax.tree.unflatten(self._treedef, out)

  def save_async(self, state, step):
    raise NotImplementedError

  def wait(self):
    pass

  def delete(self, step):
    shutil.rmtree(self._folder(step), ignore_errors=True)

  def close(self):
    pass


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _check(restored: Any, state: Any, who: str) -> None:
  """The first and last leaf of a restore equal the saved ones."""
  got, want = jax.tree.leaves(restored), jax.tree.leaves(state)
  if len(got) != len(want):
    raise AssertionError(f"{who}: restored {len(got)} leaves, saved {len(want)}")
  for i in (0, len(got) - 1):
    if not np.array_equal(np.asarray(got[i]), np.asarray(want[i])):
      raise AssertionError(f"{who}: leaf {i} restored other values")


def measure_state(
  name: str,
  state: Any,
  systems: Sequence[System],
  *,
  rounds: int,
  log: Callable[[str], None],
  settle_secs: float = SETTLE_SECS,
) -> dict[str, Any]:
  """Times each system on `state`, `rounds` times, in a new (seeded) order each round.

  A shuffle rather than a rotation: a rotation keeps each system after the
  same other one every round, and what that one left behind (memory freed,
  page cache dropped) then weighs on the same system each time.
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  samples: dict[str, dict[str, list[float]]] = {s.name: {m: [] for m in MEASURES} for s in systems}
  shuffle = random.Random(0)
  step = 0
  for r in range(rounds + 1):  # round 0 warms up (compilation, first-use costs), untimed
    # A new order each round: no system always comes first, nor always after the same one.
    order = shuffle.sample(list(systems), len(systems))
    for system in order:
      got = samples[system.name] if r else {m: [] for m in MEASURES}
      step += 1
      flush_all()  # no system pays for the write-back of another's files
      settle(settle_secs)
      cpu = resource.getrusage(resource.RUSAGE_SELF)
      seconds, _ = _timed(lambda s=system, st=step: (s.save(state, st), s.make_durable(st, saved_async=False)))
      got["save_s"].append(seconds)
      cpu_after = resource.getrusage(resource.RUSAGE_SELF)
      got["save_user_s"].append(cpu_after.ru_utime - cpu.ru_utime)
      got["save_kernel_s"].append(cpu_after.ru_stime - cpu.ru_stime)
      for measure, read in (
        ("restore_s", lambda s=system, st=step: s.restore(abstract, st)),
        ("restore_no_target_s", lambda s=system, st=step: s.restore_no_target(st)),
      ):
        evict(system.root)
        settle(settle_secs)
        seconds, restored = _timed(lambda read=read: jax.block_until_ready(read()))
        got[measure].append(seconds)
        _check(restored, state, f"{system.name} {measure}")
        del restored
        gc.collect()
      system.delete(step)
      if not isinstance(system, Files):
        step += 1
        flush_all()
        settle(settle_secs)
        start = time.perf_counter()
        system.save_async(state, step)
        got["async_blocked_s"].append(time.perf_counter() - start)
        system.wait()
        system.make_durable(step, saved_async=True)
        got["async_durable_s"].append(time.perf_counter() - start)
        system.delete(step)
      gc.collect()
    log(f"  {name}: round {r}/{rounds} done" + (" (warm-up)" if not r else ""))
  leaves = jax.tree.leaves(state)
  return {
    "state": name,
    "bytes": sum(x.nbytes for x in leaves),
    "leaves": len(leaves),
    "rounds": rounds,
    "samples": samples,
  }


def run_kauldron(python: str, name: str, args: argparse.Namespace, root: Path, log: Callable[[str], None]) -> dict[str, Any]:
  """Kauldron's numbers on state `name`, from `benchmarks.kauldron_worker` in its side environment."""
  out = root / f"kauldron_{name}.json"
  workdir = root / f"kauldron_{name}"
  command = [python, "-m", "benchmarks.kauldron_worker", "--state", name, "--scale", str(args.scale)]
  command += ["--deep-leaves", str(args.deep_leaves), "--root", str(workdir), "--rounds", str(args.rounds), "--json", str(out)]
  command += ["--settle-secs", str(args.settle_secs)]
  log(f"  {name}: kauldron in {python} ...")
  subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
  shutil.rmtree(workdir, ignore_errors=True)
  return json.loads(out.read_text())


# ---------------------------------------------------------------------------
# Summaries and the table
# ---------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
  return statistics.median(values) if values else None


def summary(row: dict[str, Any]) -> dict[str, dict[str, float | None]]:
  """System -> measure -> median seconds."""
  return {system: {m: _median(v) for m, v in got.items()} for system, got in row["samples"].items()}


def ratios(row: dict[str, Any]) -> dict[str, float | None]:
  """kckpt against tuned Orbax, plain files and Kauldron: speed ratios (> 1: kckpt faster), blocked share."""
  s = summary(row)
  k = s["kckpt"]

  def speed(other: str, measure: str, mine: str | None = None) -> float | None:
    theirs, ours = s.get(other, {}).get(measure), k.get(mine or measure)
    return None if theirs is None or not ours else theirs / ours

  blocked, save = k["async_blocked_s"], k["save_s"]
  orbax_blocked = s.get("orbax", {}).get("async_blocked_s")
  return {
    "save vs orbax tuned": speed("orbax tuned", "save_s"),
    "save vs files": speed("files", "save_s"),
    "restore vs files": speed("files", "restore_s"),
    "restore (no target) vs files": speed("files", "restore_no_target_s"),
    "restore vs orbax tuned": speed("orbax tuned", "restore_s"),
    "blocked / sync save": None if blocked is None or not save else blocked / save,
    "blocked vs orbax": None if blocked is None or not orbax_blocked else blocked / orbax_blocked,
    "durable vs orbax tuned": speed("orbax tuned", "async_durable_s"),
    "save vs kauldron": speed("kauldron", "save_s"),
    "restore vs kauldron": speed("kauldron", "restore_s"),
  }


# The goals of the speed issue, each (name, ratio key, threshold, at least?): ratios from `ratios`.
GOALS = (
  ("save >= 1.0x tuned Orbax", "save vs orbax tuned", 1.0, True),
  ("save >= 0.9 of plain files", "save vs files", 0.9, True),
  ("restore >= 0.8 of plain files", "restore vs files", 0.8, True),
  ("restore, no target, >= 0.8 of plain files", "restore (no target) vs files", 0.8, True),
  ("async: blocked <= Orbax's", "blocked vs orbax", 1.0, False),
  ("async: blocked <= 2% of a sync save", "blocked / sync save", 0.02, False),
  ("async: until durable <= tuned Orbax's", "durable vs orbax tuned", 1.0, True),
  ("save >= 1.4x Kauldron", "save vs kauldron", 1.4, True),
  ("restore >= 1.4x Kauldron", "restore vs kauldron", 1.4, True),
)


def goals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each goal on each state: the ratio measured and whether it is met (goals without the systems they need are left out)."""
  out = []
  for name, key, threshold, at_least in GOALS:
    for row in rows:
      value = ratios(row).get(key)
      if value is not None:
        met = value >= threshold if at_least else value <= threshold
        out.append({"goal": name, "state": row["state"], "value": value, "met": met})
  return out


def print_goals(rows: Sequence[dict[str, Any]]) -> None:
  states = [row["state"] for row in rows]
  results = goals(rows)
  print("\n| goal | " + " | ".join(states) + " |")
  print("| --- |" + " ---: |" * len(states))
  for name, *_ in GOALS:
    cells = {g["state"]: g for g in results if g["goal"] == name}
    if cells:
      shown = [f"{cells[s]['value']:.2f} {'met' if cells[s]['met'] else 'missed'}" if s in cells else "–" for s in states]
      print(f"| {name} | " + " | ".join(shown) + " |")


def _mbps(row: dict[str, Any], system: str, measure: str) -> str:
  values = row["samples"].get(system, {}).get(measure) or []
  if not values:
    return "–"
  rates = sorted(row["bytes"] / 1e6 / v for v in values)
  mid = row["bytes"] / 1e6 / statistics.median(values)
  return f"{mid:.0f} ({rates[0]:.0f}–{rates[-1]:.0f})" if len(rates) > 1 else f"{mid:.0f}"


def _ms(row: dict[str, Any], system: str, measure: str) -> str:
  value = _median(row["samples"].get(system, {}).get(measure) or [])
  if value is None:
    return "–"
  if measure == "async_blocked_s":
    return f"{value * 1e3:.0f} ms"
  return f"{value:.2f}" if measure in ("save_user_s", "save_kernel_s") else f"{value:.2f} s"


def print_tables(rows: Sequence[dict[str, Any]]) -> None:
  for row in rows:
    print(f"\n{row['state']}: {row['leaves']} leaves, {row['bytes'] / 1e9:.2f} GB, {row['rounds']} rounds")
    print(
      "| system | save MB/s | save CPU s: user / kernel | restore MB/s | restore, no target, MB/s"
      " | async: caller blocked | async: until durable |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for system in row["samples"]:
      cells = [_mbps(row, system, "save_s"), f"{_ms(row, system, 'save_user_s')} / {_ms(row, system, 'save_kernel_s')}"]
      cells += [_mbps(row, system, m) for m in ("restore_s", "restore_no_target_s")]
      cells += [_ms(row, system, m) for m in ("async_blocked_s", "async_durable_s")]
      print(f"| {system} | " + " | ".join(cells) + " |")
    print("  " + "; ".join(f"{k} {v:.2f}" for k, v in ratios(row).items() if v is not None))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--states", nargs="+", choices=states_lib.STATES, default=list(states_lib.STATES))
  parser.add_argument("--deep-leaves", type=int, default=3000, help="parameter leaves of the deep state (x3 with Adam)")
  parser.add_argument("--scale", type=float, default=1.0, help="shrink the states (smoke runs)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--settle-secs", type=float, default=SETTLE_SECS, help="pause before each timed call (0: smoke runs)")
  parser.add_argument("--systems", nargs="+", default=["kckpt", "orbax", "orbax tuned", "files"])
  parser.add_argument("--kauldron-python", default=None, help="the side environment's python (benchmarks/kauldron_venv.sh)")
  parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
  parser.add_argument("--json", type=Path, default=None)
  parser.add_argument("--quiet", action="store_true")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, print_report: bool = True) -> list[dict[str, Any]]:
  args = _parse(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)

  def log(msg: str) -> None:
    if not args.quiet:
      print(msg, file=sys.stderr, flush=True)

  root = Path(tempfile.mkdtemp(prefix="kckpt_bench_realistic_", dir=args.dir))
  rows = []
  try:
    for name in args.states:
      state = states_lib.make(name, scale=args.scale, deep_leaves=args.deep_leaves)
      log(f"{name}: {states_lib.describe(state)}, {args.rounds} rounds ...")
      makers: dict[str, Callable[[Path], System]] = {
        "kckpt": Kckpt,
        "orbax": lambda p: Orbax(p, tuned=False),
        "orbax tuned": lambda p: Orbax(p, tuned=True),
        "files": Files,
      }
      systems = [makers[s](root / f"{name}_{s.replace(' ', '_')}") for s in args.systems]
      try:
        row = measure_state(name, state, systems, rounds=args.rounds, log=log, settle_secs=args.settle_secs)
      finally:
        for system in systems:
          system.close()
          shutil.rmtree(system.root, ignore_errors=True)
      if args.kauldron_python:
        got = run_kauldron(args.kauldron_python, name, args, root, log)
        row["kauldron"] = got.get("system")
        row["samples"]["kauldron"] = {m: got.get(m, []) for m in MEASURES}
      rows.append(row)
      del state
      gc.collect()
  finally:
    shutil.rmtree(root, ignore_errors=True)
  for row in rows:
    row["ratios"] = ratios(row)
  if args.json:
    args.json.write_text(json.dumps(rows, indent=2))
  if print_report:
    print_tables(rows)
    print_goals(rows)
  return rows


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--print":
    loaded = json.loads(Path(sys.argv[2]).read_text())
    print_tables(loaded)
    print_goals(loaded)
  else:
    main()
