"""Peak memory of a restore: kckpt with and without donation, next to raw Orbax.

Each restore runs in a fresh process that first builds the target state (as a
training job would), then restores into it; the number reported is how much
the process's peak resident memory grew during the restore, as a fraction of
the state's size (on Linux the peak is first lowered to what is resident once
the target is built and kckpt and Orbax are imported: ``/proc/self/clear_refs``).
Goal: a donated restore adds less than 25% of the state.

    python -m benchmarks.restore_memory [--mb 512] [--leaves 8] [--json out.json]
    python -m benchmarks.restore_memory --state gpt2   # a realistic train state (benchmarks.states): gpt2, deep, mixed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("kckpt_donate", "kckpt_no_donate", "orbax")


def make_state(megabytes: int, leaves: int, fill: float):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  n = megabytes * 1024 * 1024 // 4 // leaves
  return {f"w{i}": jnp.full((n,), fill + i, jnp.float32) for i in range(leaves)}


def peak_rss_bytes() -> int:
  """The process's peak resident memory (Linux: ``VmHWM``, which `reset_peak_rss` can lower; else ``ru_maxrss``)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> None:
  """Lowers the peak to the memory resident now (Linux 4.0+), so that what building the target briefly held
  (temporary copies, since freed) does not hide the restore's own peak; elsewhere the peak stays as it is."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def child(workdir: str, mode: str, megabytes: int, leaves: int, state: str | None = None, deep_leaves: int = 3000) -> dict:
  """Builds the target, restores into it, returns the growth of peak RSS."""
  import jax  # pylint: disable=g-import-not-at-top

  if state is not None:
    from benchmarks import states  # pylint: disable=g-import-not-at-top

    target = states.zeros(state, deep_leaves=deep_leaves)
  else:
    target = make_state(megabytes, leaves, fill=0.0)
  jax.block_until_ready(target)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  # imported before: not the restore's memory

  import kckpt  # pylint: disable=g-import-not-at-top

  reset_peak_rss()
  before = peak_rss_bytes()
  if mode == "orbax":
    with ocp.CheckpointManager(
      Path(workdir) / "checkpoints", options=ocp.CheckpointManagerOptions(step_prefix="ckpt", create=False)
    ) as mngr:
      restored = mngr.restore(1, args=ocp.args.StandardRestore(target))
  else:
    restored = kckpt.Checkpointer.open(workdir).restore(target, donate=mode == "kckpt_donate")
  jax.block_until_ready(restored)
  after = peak_rss_bytes()
  if state is not None:
    first = jax.tree.leaves(restored["params"])[0]
    assert float(abs(first.astype("float32")).max()) > 0  # the saved values, not the zeros of the target
  else:
    assert float(restored["w1"][0]) == 1.0 + 1.0
  nbytes = sum(x.nbytes for x in jax.tree.leaves(restored))
  return {"mode": mode, "added_bytes": after - before, "state_bytes": nbytes}


def measure(megabytes: int = 512, leaves: int = 8, state: str | None = None, deep_leaves: int = 3000) -> dict:
  import kckpt  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory(prefix="kckpt_bench_mem_") as workdir:
    with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
      if state is not None:
        from benchmarks import states  # pylint: disable=g-import-not-at-top

        ckpt.save(states.make(state, deep_leaves=deep_leaves), step=1)
      else:
        ckpt.save(make_state(megabytes, leaves, fill=1.0), step=1)
    results = {}
    for mode in MODES:
      out = subprocess.run(
        [
          sys.executable,
          "-m",
          "benchmarks.restore_memory",
          "--child",
          mode,
          "--workdir",
          workdir,
          "--mb",
          str(megabytes),
          "--leaves",
          str(leaves),
          "--deep-leaves",
          str(deep_leaves),
          *(["--state", state] if state else []),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
      )
      if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
      results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  return {"state": state, "state_mb": megabytes, "leaves": leaves, "results": results}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mb", type=int, default=512)
  parser.add_argument("--leaves", type=int, default=8)
  parser.add_argument("--state", choices=["gpt2", "deep", "mixed"], default=None, help="a realistic train state instead")
  parser.add_argument("--deep-leaves", type=int, default=3000)
  parser.add_argument("--json", type=Path, default=None)
  parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.workdir, args.child, args.mb, args.leaves, args.state, args.deep_leaves)))
    return {}
  report = measure(args.mb, args.leaves, args.state, args.deep_leaves)
  what = f"the {args.state} train state" if args.state else f"a {args.mb} MB float32 state in {args.leaves} arrays"
  print(f"restore of {what}: growth of peak RSS during restore")
  for mode, r in report["results"].items():
    print(f"  {mode:>16}: {r['added_bytes'] / 2**20:8.1f} MB  ({r['added_bytes'] / r['state_bytes']:.0%} of the state)")
  if args.json:
    args.json.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
