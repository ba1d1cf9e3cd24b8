"""How long ``kckpt ls RUN`` takes, start to exit, in a fresh process.

For runs of 10, 1000 and 10000 steps: the wall time of ``python -m kckpt.cli
ls RUN`` (interpreter start, imports, one listing, each step's small files and
folder size, the table) in a new subprocess, and of ``python -c pass`` for
the interpreter's own start. With ``--baseline-python``, the same command run
by another interpreter (an older kckpt installed in another virtual
environment) alternates with this one on the same folders, so the two are
compared in one run.

Each process finds its modules' bytecode cached, as an installed package has
it: the subprocesses write and read it under the benchmark's temporary folder
(``PYTHONPYCACHEPREFIX``; ``PYTHONDONTWRITEBYTECODE`` is dropped), so nothing
is written next to either kckpt's sources and each module is compiled once, in
the untimed first run.

Steps are real checkpoints: 10 are saved with `kckpt.Checkpointer` (a small
tree and metrics), the others are hard-linked copies of them (``cp -al``), so
building a run of 10000 steps takes seconds.

    python -m benchmarks.cli_listing [--sizes 10 1000 10000] [--repeats 5] [--baseline-python OLD/bin/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kckpt

TEMPLATES = 10  # steps saved for real; the others copy them


def make_run(root: Path, num_steps: int) -> Path:
  workdir = root / f"run_{num_steps}"
  saved = min(num_steps, TEMPLATES)
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in range(saved):
      state = {"params": {"w": np.full((16, 16), step, np.float32), "b": np.zeros(16, np.float32)}, "step": step}
      ckpt.save(state, step=step, metrics={"loss": 1.0 / (step + 1), "eval": {"acc": step / 10}})
  checkpoints = workdir / "checkpoints"
  for step in range(saved, num_steps):
    subprocess.run(["cp", "-al", str(checkpoints / f"ckpt_{step % saved}"), str(checkpoints / f"ckpt_{step}")], check=True)
  return workdir


def time_command(command: list[str], cwd: Path, env: dict[str, str]) -> float:
  start = time.perf_counter()
  subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000, 10000])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--baseline-python", default=None, help="an interpreter with another kckpt installed: timed alongside")
  parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
  args = parser.parse_args(argv)
  pythons = {"this": sys.executable}
  if args.baseline_python:
    pythons["baseline"] = args.baseline_python
  results = []
  root = Path(tempfile.mkdtemp(prefix="kckpt_bench_cli_"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
  env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
  try:
    for size in args.sizes:
      workdir = make_run(root, size)
      # Run from the run's folder: `-m kckpt.cli` must import each interpreter's own kckpt, not a checkout in the cwd.
      samples: dict[str, list[float]] = {"python": [], **{name: [] for name in pythons}}
      for python in pythons.values():  # once untimed each: the page cache holds the files, the bytecode is written
        time_command([python, "-m", "kckpt.cli", "ls", str(workdir)], root, env)
      time_command([sys.executable, "-c", "pass"], root, env)
      for i in range(args.repeats):
        order = list(pythons.items()) if i % 2 == 0 else list(reversed(pythons.items()))
        for name, python in order:
          samples[name].append(time_command([python, "-m", "kckpt.cli", "ls", str(workdir)], root, env))
        samples["python"].append(time_command([sys.executable, "-c", "pass"], root, env))
      row: dict = {"steps": size}
      for name, values in samples.items():
        row[f"{name}_ms"] = 1000 * statistics.median(values)
      if "baseline" in pythons:
        row["this_over_baseline"] = row["this_ms"] / row["baseline_ms"]
      results.append(row)
      shutil.rmtree(workdir)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  header = f"{'steps':>7} | {'python -c pass':>14} | {'kckpt ls':>9}"
  if args.baseline_python:
    header += f" | {'baseline ls':>11} | {'this/baseline':>13}"
  print(header)
  for r in results:
    line = f"{r['steps']:>7} | {r['python_ms']:>12.0f}ms | {r['this_ms']:>7.0f}ms"
    if args.baseline_python:
      line += f" | {r['baseline_ms']:>9.0f}ms | {100 * r['this_over_baseline']:>12.1f}%"
    print(line)
  report = {"benchmark": "cli_listing", "median_of": args.repeats, "cpu_count": os.cpu_count(), "results": results}
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
