"""The local tier against the persistent tier: one state, 1, 2 and 4 processes, the same run.

For each process count, one cluster of local JAX processes (127.0.0.1, gloo)
holds one sharded state (by default 256 MB in 8 float32 arrays of random
values, over 4 CPU devices split between the processes) and times,
alternating:

* a **persistent** save: `Checkpointer.save` to the workdir (a local folder,
  or ``s3://`` on a local moto server with ``--s3``), async: how long it
  blocks the caller, and how long until `wait_until_finished` returns;
* a **local** save: `maybe_save` of a `Checkpointer` whose only rule is
  ``local_save_interval_steps=1`` (each process's shards in its own folder,
  plus one peer copy when there are several processes): the same two times;
* a restore of each (``restore()`` onto the same shardings), after the
  files were dropped from the page cache;
* the same saves **in a training loop**: `maybe_save` at a due step, then
  ``--loop-steps`` training steps (a jitted matrix product over the same
  devices, with a collective, its result read back as a loss would be), each
  followed by `maybe_save`, then `wait_until_finished`: the time spent in
  those `maybe_save` calls (what the loop lost to the save), and what was
  left for `wait_until_finished`. A training step alone is timed for scale.

A time is the primary's wall clock between two barriers (so the slowest
process counts); medians of ``--repeats``.

    python -m benchmarks.tiers [--megabytes 256] [--processes 1 2 4] [--devices 4] [--repeats 3] [--loop-steps 8]
                               [--step-size 2048] [--s3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from benchmarks import multihost

NUM_ARRAYS = multihost.NUM_ARRAYS
RESULT_PREFIX = "RESULT "
S3_BUCKET = "kckpt-bench"
KINDS = ("persistent", "local")


def worker(args: argparse.Namespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  import kckpt  # pylint: disable=g-import-not-at-top
  from benchmarks.pagecache import evict  # pylint: disable=g-import-not-at-top

  sharding, rows, cols = multihost.join_cluster(args)
  rng = np.random.default_rng(0)  # the same values on every process; weights-like, not constants
  host = [rng.normal(0, 0.02, (rows, cols)).astype(np.float32) for _ in range(NUM_ARRAYS)]
  state = {f"w{i}": jax.make_array_from_callback((rows, cols), sharding, lambda idx, a=a: a[idx]) for i, a in enumerate(host)}
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
  root = Path(args.root)
  persistent_dir = args.persistent or str(root / "persistent")
  common = {"max_to_keep": 2, "handle_sigterm": False, "barrier_timeout_secs": 300}
  ckpts = {
    "persistent": kckpt.Checkpointer(workdir=persistent_dir, save_interval_steps=1, **common),
    "local": kckpt.Checkpointer(
      workdir=root / "tiered",
      save_interval_steps=None,
      local_workdir=root / "local" / "host{process_index}",
      local_save_interval_steps=1,
      **common,
    ),
  }
  loop_every = args.loop_steps + 1
  looped = {
    "persistent": kckpt.Checkpointer(workdir=root / "looped_persistent", save_interval_steps=loop_every, **common),
    "local": kckpt.Checkpointer(
      workdir=root / "looped_tiered",
      save_interval_steps=None,
      local_workdir=root / "looped_local" / "host{process_index}",
      local_save_interval_steps=loop_every,
      **common,
    ),
  }
  # A training step's stand-in: a product of two square matrices sharded over every device, and a sum (a collective).
  x = jax.device_put(rng.normal(0, 0.02, (args.step_size, args.step_size)).astype(np.float32), sharding)
  train_step = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T)))
  count = [0]

  def barrier() -> None:
    count[0] += 1
    multihost_utils.sync_global_devices(f"tiers_{count[0]}")

  phases = ("blocked", "durable", "restore", "loop_blocked", "loop_left")
  times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in phases} for k in KINDS}
  step_times = []
  for _ in range(5):
    start = time.perf_counter()
    float(train_step(x))
    step_times.append(time.perf_counter() - start)
  for repeat in range(args.repeats):
    step = repeat + 1
    for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:
      ckpt = ckpts[kind]
      barrier()
      start = time.perf_counter()
      if kind == "persistent":
        ckpt.save(state, step=step)
      else:
        ckpt.maybe_save(state, step=step)
      blocked = time.perf_counter() - start
      ckpt.wait_until_finished()
      barrier()
      times[kind]["durable"].append(time.perf_counter() - start)
      times[kind]["blocked"].append(blocked)
      if not args.persistent or kind == "local":
        evict(root)
      reader = ckpts[kind]
      barrier()
      start = time.perf_counter()
      restored = jax.block_until_ready(reader.restore(abstract))
      barrier()
      times[kind]["restore"].append(time.perf_counter() - start)
      stats = reader.last_restore_stats
      assert stats is not None and stats.tier == kind and stats.step == step, (kind, stats)
      for k, v in restored.items():
        i = int(k[1:])
        assert all(np.array_equal(np.asarray(s.data), host[i][s.index]) for s in v.addressable_shards), f"{kind}: {k}"
      del restored
    for kind in KINDS if repeat % 2 == 0 else KINDS[::-1]:
      ckpt = looped[kind]
      barrier()
      lost = 0.0
      for step in range((repeat + 1) * loop_every, (repeat + 2) * loop_every - 1):  # a due step, then the others
        if step % loop_every:
          float(train_step(x))
        start = time.perf_counter()
        ckpt.maybe_save(state, step=step)
        lost += time.perf_counter() - start
      start = time.perf_counter()
      ckpt.wait_until_finished()
      times[kind]["loop_left"].append(time.perf_counter() - start)
      times[kind]["loop_blocked"].append(lost)
      barrier()
  for ckpt in [*ckpts.values(), *looped.values()]:
    ckpt.close()
  if jax.process_index() == 0:
    result = {"megabytes": NUM_ARRAYS * rows * cols * 4 / 2**20, "times": times, "step_s": statistics.median(step_times[1:])}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def moto_server(root: Path) -> Iterator[dict[str, str]]:
  """A local S3 server (moto, from the test extra) with one bucket; yields the environment that points at it."""
  import boto3  # pylint: disable=g-import-not-at-top

  exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
  if not exe:
    raise SystemExit("--s3 needs moto_server: pip install -e '.[test]'")
  port = multihost._free_port()  # pylint: disable=protected-access
  endpoint = f"http://127.0.0.1:{port}"
  (root / "aws_config").write_text("")
  env = {
    "AWS_ENDPOINT_URL": endpoint,
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": str(root / "aws_config"),
    "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws_config"),
  }
  with open(root / "moto.log", "wb") as log:
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"moto_server did not start: see {root / 'moto.log'}") from None
        time.sleep(0.1)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=S3_BUCKET)  # fmt: skip
    yield env
  finally:
    proc.kill()
    proc.wait()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--megabytes", type=float, default=256, help="total state size")
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--devices", type=int, default=4, help="total CPU devices, split between the processes")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--loop-steps", type=int, default=8, help="training steps after a save in the loop measurement")
  parser.add_argument("--step-size", type=int, default=2048, help="the training step's matrices are this square")
  parser.add_argument("--s3", action="store_true", help="the persistent tier on s3:// (a local moto server)")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per cluster")
  parser.add_argument("--json", type=Path, default=None)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  parser.add_argument("--persistent", default=None, help=argparse.SUPPRESS)
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
  base = Path(tempfile.mkdtemp(prefix="kckpt_bench_tiers_"))
  try:
    with moto_server(base) if args.s3 else contextlib.nullcontext({}) as env:
      for n in args.processes:
        root = base / f"p{n}"
        root.mkdir()
        extra = ["--megabytes", str(args.megabytes), "--repeats", str(args.repeats), "--loop-steps", str(args.loop_steps)]
        extra += ["--step-size", str(args.step_size)]
        if args.s3:
          extra += ["--persistent", f"s3://{S3_BUCKET}/p{n}"]
        measured = multihost.run_cluster(n, args, root, module="benchmarks.tiers", extra_args=extra, extra_env=env)
        row: dict = {"processes": n, "megabytes": measured["megabytes"], "step_s": measured["step_s"]}
        for kind, phases in measured["times"].items():
          for phase, samples in phases.items():
            row[f"{kind}_{phase}_s"] = statistics.median(samples)
        results.append(row)
  finally:
    shutil.rmtree(base, ignore_errors=True)
  where = "s3:// (moto, local)" if args.s3 else "local disk"
  mb = results[0]["megabytes"] if results else 0
  print(
    f"{mb:.0f} MB in {NUM_ARRAYS} arrays over {args.devices} CPU devices; persistent tier on {where}; median of {args.repeats}"
  )
  print(
    f"{'processes':>9} | {'tier':>10} | {'blocked':>8} {'durable':>8} {'restore':>8} | "
    f"{'in a loop of':>12} {'lost':>8} {'left':>8}"
  )
  for r in results:
    for kind in KINDS:
      print(
        f"{r['processes']:>9} | {kind:>10} | {r[f'{kind}_blocked_s']:>7.3f}s {r[f'{kind}_durable_s']:>7.3f}s "
        f"{r[f'{kind}_restore_s']:>7.3f}s | {args.loop_steps:>3} x {r['step_s']:.3f}s "
        f"{r[f'{kind}_loop_blocked_s']:>7.3f}s {r[f'{kind}_loop_left_s']:>7.3f}s"
      )
  report = {"benchmark": "tiers", "persistent": where, "median_of": args.repeats, "devices": args.devices, "results": results}
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
