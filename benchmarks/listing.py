"""Opening a run and listing its steps: kckpt vs a raw Orbax CheckpointManager.

For runs of 10, 100, 1000 and 10000 steps, in the same process and run:
open a read-only kckpt `Checkpointer` and read `latest_step` and `all_steps`,
then `reload()` and read them again; the same with Orbax's `CheckpointManager`
(`create=False`, its defaults otherwise) on the same folders.

Steps are real Orbax checkpoints: one is saved, the others are hard-linked
copies of it, so building a run of 10000 steps takes seconds.

    python -m benchmarks.listing [--sizes 10 100 1000 10000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

import kckpt


def make_run(root: Path, num_steps: int) -> Path:
  workdir = root / f"run_{num_steps}"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"w": np.ones(8, np.float32)}, step=0, metrics={"loss": 1.0})
  checkpoints = workdir / "checkpoints"
  template = checkpoints / "ckpt_0"
  for step in range(1, num_steps):
    subprocess.run(["cp", "-al", str(template), str(checkpoints / f"ckpt_{step}")], check=True)
  return workdir


def time_kckpt(workdir: Path) -> tuple[float, float]:
  start = time.perf_counter()
  ckpt = kckpt.Checkpointer.open(workdir)
  latest, steps = ckpt.latest_step, ckpt.all_steps
  opened = time.perf_counter() - start
  start = time.perf_counter()
  ckpt.reload()
  assert ckpt.latest_step == latest and len(ckpt.all_steps) == len(steps)
  return opened, time.perf_counter() - start


def time_orbax(workdir: Path) -> tuple[float, float]:
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt", create=False, read_only=True)
  start = time.perf_counter()
  manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
  latest, steps = manager.latest_step(), manager.all_steps()
  opened = time.perf_counter() - start
  start = time.perf_counter()
  manager.reload()
  assert manager.latest_step() == latest and len(manager.all_steps()) == len(steps)
  reloaded = time.perf_counter() - start
  manager.close()
  return opened, reloaded


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
  args = parser.parse_args(argv)
  results = []
  root = Path(tempfile.mkdtemp(prefix="kckpt_bench_listing_"))
  try:
    for size in args.sizes:
      workdir = make_run(root, size)
      samples = {"kckpt": [], "orbax": []}
      for _ in range(args.repeats):  # alternate, so both see the same cache state
        samples["kckpt"].append(time_kckpt(workdir))
        samples["orbax"].append(time_orbax(workdir))
      row = {"steps": size}
      for name, values in samples.items():
        row[f"{name}_open_ms"] = 1000 * statistics.median(v[0] for v in values)
        row[f"{name}_reload_ms"] = 1000 * statistics.median(v[1] for v in values)
      row["open_ratio"] = row["orbax_open_ms"] / max(row["kckpt_open_ms"], 1e-9)
      row["reload_ratio"] = row["orbax_reload_ms"] / max(row["kckpt_reload_ms"], 1e-9)
      results.append(row)
      shutil.rmtree(workdir)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(
    f"{'steps':>7} | {'kckpt open':>11} {'reload':>8} | {'orbax open':>11} {'reload':>8} | {'orbax/kckpt open':>16} {'reload':>8}"
  )
  for r in results:
    print(
      f"{r['steps']:>7} | {r['kckpt_open_ms']:>9.2f}ms {r['kckpt_reload_ms']:>6.2f}ms | "
      f"{r['orbax_open_ms']:>9.2f}ms {r['orbax_reload_ms']:>6.2f}ms | {r['open_ratio']:>15.1f}x {r['reload_ratio']:>7.1f}x"
    )
  report = {"benchmark": "listing", "median_of": args.repeats, "cpu_count": os.cpu_count(), "results": results}
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
