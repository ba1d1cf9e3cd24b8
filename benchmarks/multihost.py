"""Saving and restoring one sharded state with 1, 2 and 4 processes: kckpt vs raw Orbax.

The total state size and the devices are fixed (by default 256 MB in 8
float32 arrays, sharded over 4 CPU devices), only the number of processes
that hold them changes (1 process with 4 devices, 2 with 2, 4 with 1): the
same layout, the same bytes. For each process count, one cluster of local
JAX processes (127.0.0.1, gloo) times, alternating, in the same run:

* kckpt: ``Checkpointer.save`` + ``wait_until_finished``, then ``restore``
  onto the same shardings;
* Orbax: a ``CheckpointManager`` (async, its defaults, the same step folder
  layout) ``save`` + ``wait_until_finished``, then ``restore``.

A time is the primary's wall clock between two barriers, so it includes the
slowest process; the median over ``--repeats`` is reported.

    python -m benchmarks.multihost [--megabytes 256] [--processes 1 2 4] [--devices 4] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NUM_ARRAYS = 8
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------------
# One process of a cluster
# ---------------------------------------------------------------------------


def join_cluster(args: argparse.Namespace) -> tuple[Any, int, int]:
  """Joins the cluster of `args` (gloo on CPU); returns a 1-D sharding over every device and the arrays' rows and columns.

  Each of the `NUM_ARRAYS` float32 arrays is ``rows x cols``, so that all of them hold ``--megabytes``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.num_processes > 1:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  cols = 1024
  rows = max(jax.device_count(), int(args.megabytes * 2**20 / 4 / cols / NUM_ARRAYS) // jax.device_count() * jax.device_count())
  return NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d")), rows, cols


def worker(args: argparse.Namespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  import kckpt  # pylint: disable=g-import-not-at-top

  sharding, rows, cols = join_cluster(args)
  host = [np.full((rows, cols), i, np.float32) for i in range(NUM_ARRAYS)]
  state = {f"w{i}": jax.make_array_from_callback((rows, cols), sharding, lambda idx, a=a: a[idx]) for i, a in enumerate(host)}
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
  total_mb = NUM_ARRAYS * rows * cols * 4 / 2**20
  root = Path(args.root)

  ckpt = kckpt.Checkpointer(workdir=root / "kckpt", save_interval_steps=1, max_to_keep=None, handle_sigterm=False)
  manager = ocp.CheckpointManager(
    root / "orbax" / "checkpoints",
    options=ocp.CheckpointManagerOptions(step_prefix="ckpt", max_to_keep=None, enable_async_checkpointing=True),
  )

  def kckpt_save(step):
    ckpt.save(state, step=step)
    ckpt.wait_until_finished()

  def kckpt_restore(step):
    return ckpt.restore(abstract, step=step)

  def orbax_save(step):
    manager.save(step, args=ocp.args.Composite(default=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()

  def orbax_restore(step):
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    restored = manager.restore(
      step, args=ocp.args.Composite(default=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    )
    return restored["default"]

  impls = {"kckpt": (kckpt_save, kckpt_restore), "orbax": (orbax_save, orbax_restore)}
  times = {name: {"save": [], "restore": []} for name in impls}
  barrier_count = [0]

  def timed(fn, *a):
    barrier_count[0] += 1
    multihost_utils.sync_global_devices(f"bench_{barrier_count[0]}_start")
    start = time.perf_counter()
    out = fn(*a)
    if out is not None:
      jax.block_until_ready(out)
    multihost_utils.sync_global_devices(f"bench_{barrier_count[0]}_end")
    return time.perf_counter() - start, out

  for repeat in range(args.repeats):
    order = list(impls) if repeat % 2 == 0 else list(impls)[::-1]  # alternate who goes first
    for name in order:
      save, restore = impls[name]
      seconds, _ = timed(save, repeat + 1)
      times[name]["save"].append(seconds)
      seconds, restored = timed(restore, repeat + 1)
      times[name]["restore"].append(seconds)
      if repeat == 0:  # check the values once
        for k, v in restored.items():
          i = int(k[1:])
          assert all(np.all(np.asarray(s.data) == i) for s in v.addressable_shards), f"{name}: wrong values in {k}"
  ckpt.close()
  manager.close()
  if jax.process_index() == 0:
    result = {"megabytes": total_mb, "devices": jax.device_count(), "times": times}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")  # one write: C++ logs share the stream
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_cluster(
  num_processes: int,
  args: argparse.Namespace,
  root: Path,
  *,
  module: str = "benchmarks.multihost",
  extra_args: list[str] | None = None,
  extra_env: dict[str, str] | None = None,
) -> dict:
  """Runs one cluster of `num_processes` workers of `module` (``--worker``); returns the primary's measurements."""
  devices_per_process = args.devices // num_processes
  if extra_args is None:
    extra_args = ["--megabytes", str(args.megabytes), "--repeats", str(args.repeats)]
  env = {
    **os.environ,
    **(extra_env or {}),
    "JAX_PLATFORMS": "cpu",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
  }
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [root / f"p{i}.log" for i in range(num_processes)]
  procs = []
  for i in range(num_processes):
    cmd = [
      sys.executable,
      "-m",
      module,
      "--worker",
      "--root",
      str(root),
      *extra_args,
      "--coordinator",
      coordinator,
      "--num-processes",
      str(num_processes),
      "--process-id",
      str(i),
    ]
    with open(logs[i], "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + args.timeout
  try:
    for p in procs:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    if p.returncode != 0:
      raise RuntimeError(f"process {i} of {num_processes} exited with {p.returncode}:\n{logs[i].read_text()[-6000:]}")
  lines = [line for line in logs[0].read_text().splitlines() if line.startswith(RESULT_PREFIX)]
  return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--megabytes", type=float, default=256, help="total state size")
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--devices", type=int, default=4, help="total CPU devices, split between the processes")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--timeout", type=float, default=900, help="seconds per cluster")
  parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return {}
  for n in args.processes:
    if n < 1 or args.devices % n:
      parser.error(f"--devices {args.devices} must be divisible by every process count (got {n})")

  results = []
  for n in args.processes:
    root = Path(tempfile.mkdtemp(prefix=f"kckpt_bench_multihost_{n}_"))
    try:
      measured = run_cluster(n, args, root)
    finally:
      shutil.rmtree(root, ignore_errors=True)
    row = {"processes": n, "devices_per_process": args.devices // n, "megabytes": measured["megabytes"]}
    for impl, phases in measured["times"].items():
      for phase, samples in phases.items():
        row[f"{impl}_{phase}_s"] = statistics.median(samples)
    for phase in ("save", "restore"):
      row[f"{phase}_ratio"] = row[f"kckpt_{phase}_s"] / max(row[f"orbax_{phase}_s"], 1e-9)
    results.append(row)

  mb = results[0]["megabytes"] if results else 0
  print(f"{mb:.0f} MB in {NUM_ARRAYS} arrays over {args.devices} CPU devices; median of {args.repeats}; {os.cpu_count()} cores")
  print(
    f"{'processes':>9} | {'kckpt save':>10} {'restore':>8} | {'orbax save':>10} {'restore':>8} | "
    f"{'kckpt/orbax save':>16} {'restore':>8}"
  )
  for r in results:
    print(
      f"{r['processes']:>9} | {r['kckpt_save_s']:>9.3f}s {r['kckpt_restore_s']:>7.3f}s | "
      f"{r['orbax_save_s']:>9.3f}s {r['orbax_restore_s']:>7.3f}s | {r['save_ratio']:>15.2f}x {r['restore_ratio']:>7.2f}x"
    )
  report = {
    "benchmark": "multihost",
    "median_of": args.repeats,
    "cpu_count": os.cpu_count(),
    "devices": args.devices,
    "results": results,
  }
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
