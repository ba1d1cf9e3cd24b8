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
  files were dropped from the page cache.

A time is the primary's wall clock between two barriers (so the slowest
process counts); medians of ``--repeats``.

    python -m benchmarks.tiers [--megabytes 256] [--processes 1 2 4] [--devices 4] [--repeats 3] [--s3] [--json out.json]
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
  count = [0]

  def barrier() -> None:
    count[0] += 1
    multihost_utils.sync_global_devices(f"tiers_{count[0]}")

  times: dict[str, dict[str, list[float]]] = {k: {"blocked": [], "durable": [], "restore": []} for k in KINDS}
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
  for ckpt in ckpts.values():
    ckpt.close()
  if jax.process_index() == 0:
    result = {"megabytes": NUM_ARRAYS * rows * cols * 4 / 2**20, "times": times}
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
        extra = ["--megabytes", str(args.megabytes), "--repeats", str(args.repeats)]
        if args.s3:
          extra += ["--persistent", f"s3://{S3_BUCKET}/p{n}"]
        measured = multihost.run_cluster(n, args, root, module="benchmarks.tiers", extra_args=extra, extra_env=env)
        row: dict = {"processes": n, "megabytes": measured["megabytes"]}
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
  print(f"{'processes':>9} | {'tier':>10} | {'blocked':>8} {'durable':>8} {'restore':>8}")
  for r in results:
    for kind in KINDS:
      print(
        f"{r['processes']:>9} | {kind:>10} | {r[f'{kind}_blocked_s']:>7.3f}s {r[f'{kind}_durable_s']:>7.3f}s "
        f"{r[f'{kind}_restore_s']:>7.3f}s"
      )
  report = {"benchmark": "tiers", "persistent": where, "median_of": args.repeats, "devices": args.devices, "results": results}
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
