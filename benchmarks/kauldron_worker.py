"""Kauldron's checkpointer (`kd.ckpts.Checkpointer`) on the benchmark train states, in a side venv.

Kauldron is not a dependency of kckpt: this worker runs under the python of the
venv that `benchmarks/kauldron_venv.sh` makes, from the repository root (so that
`benchmarks.states`, which needs only jax and numpy, imports). It never imports
kckpt (not installed there) nor `benchmarks.run` (which does).

    bash benchmarks/kauldron_venv.sh            # prints .venv-kauldron/bin/python
    .venv-kauldron/bin/python -m benchmarks.kauldron_worker --state gpt2 --scale 1.0 \\
      --deep-leaves 3000 --root /tmp/kd-bench --rounds 3 --json kauldron.json

The state is wrapped as a Kauldron trainer holds it: a `flax.struct.dataclass`
`TrainState(step, params, collections, opt_state)` that subclasses
`kd.ckpts.items.StandardCheckpointItem` (the same fields as `kd.train.TrainState`,
which is not imported because `kauldron.train` needs TensorFlow, clu, grain...).
The Checkpointers are configured as a user would: `workdir`, `save_interval_steps=1`,
the other fields at their defaults.

Each round, after one untimed warm-up round of the same steps:

1. after a ``sync`` of the machine (untimed), sync save: `save(state, step=)`
   then `wait_until_finished()` (Kauldron has no switch to turn Orbax's async
   saving off) and an fsync of the step's files and folders (TensorStore
   fsyncs Orbax's array data, not its metadata), on the Checkpointer of
   ``ROOT/sync``: timed until durable, like the others;
2. the step's files are fsynced and dropped from the page cache;
3. restore into a target of zeros of the same structure (`restore(target, step=)`,
   Kauldron's default `donate=True` deletes the target's arrays first), until
   `jax.block_until_ready`; the first and last leaf are checked;
4. the step is deleted;
5. async save on the Checkpointer of ``ROOT/async``: the time the call blocked
   the caller, and the time until `wait_until_finished` returned and the files
   were fsynced; the step is deleted.

So the disk holds at most one state. Writes JSON:
``{"system", "state", "bytes", "leaves", "save_s", "restore_s", "async_blocked_s", "async_durable_s",
"save_user_s", "save_kernel_s"}`` (the last two: the process's CPU time of each sync save)
(bytes and leaves of `benchmarks.states.make`, without the wrapper's `step`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from kauldron import kd  # noqa: E402

from benchmarks import states  # noqa: E402
from benchmarks.pagecache import SETTLE_SECS  # noqa: E402
from benchmarks.pagecache import evict  # noqa: E402
from benchmarks.pagecache import flush_all  # noqa: E402
from benchmarks.pagecache import make_durable  # noqa: E402
from benchmarks.pagecache import settle  # noqa: E402


@flax.struct.dataclass
class TrainState(kd.ckpts.items.StandardCheckpointItem):
  """The fields of `kd.train.TrainState`."""

  _: dataclasses.KW_ONLY
  step: Any
  params: Any
  collections: Any
  opt_state: Any


def wrap(tree: dict[str, Any]) -> TrainState:
  return TrainState(step=jnp.asarray(1000), params=tree["params"], collections={}, opt_state=tree["opt_state"])


def check_restored(restored: TrainState, tree: dict[str, Any]) -> None:
  """The first and last leaf of the restored state equal the saved ones."""
  got = jax.tree.leaves({"params": restored.params, "opt_state": restored.opt_state})
  want = jax.tree.leaves(tree)
  if len(got) != len(want):
    raise AssertionError(f"kauldron restored {len(got)} leaves, saved {len(want)}")
  for i in (0, len(want) - 1):
    if not np.array_equal(np.asarray(got[i]), np.asarray(want[i])):
      raise AssertionError(f"kauldron restored different values in leaf {i}")


def one_round(
  sync: Any, async_: Any, state: TrainState, tree: dict[str, Any], step: int, root: Path, settle_secs: float
) -> dict[str, float]:
  flush_all()  # no save pays for the write-back of an earlier one's files
  settle(settle_secs)  # as `benchmarks.realistic` does
  cpu, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  sync.save(state, step=step)
  sync.wait_until_finished()
  make_durable(root / "sync")  # Orbax fsyncs its array data (TensorStore), not its metadata
  save_s = time.perf_counter() - start
  cpu_after = resource.getrusage(resource.RUSAGE_SELF)
  evict(root / "sync")

  target = jax.block_until_ready(jax.tree.map(jnp.zeros_like, state))
  settle(settle_secs)
  start = time.perf_counter()
  restored = jax.block_until_ready(sync.restore(target, step=step))
  restore_s = time.perf_counter() - start
  check_restored(restored, tree)
  del restored, target
  sync.delete(step)
  gc.collect()

  flush_all()
  settle(settle_secs)
  start = time.perf_counter()
  async_.save(state, step=step)
  blocked_s = time.perf_counter() - start
  async_.wait_until_finished()
  make_durable(root / "async")
  durable_s = time.perf_counter() - start
  async_.delete(step)
  gc.collect()
  return {
    "save_s": save_s,
    "restore_s": restore_s,
    "async_blocked_s": blocked_s,
    "async_durable_s": durable_s,
    "save_user_s": cpu_after.ru_utime - cpu.ru_utime,
    "save_kernel_s": cpu_after.ru_stime - cpu.ru_stime,
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--state", choices=states.STATES, default="gpt2")
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--deep-leaves", type=int, default=3000)
  parser.add_argument("--root", type=Path, required=True, help="a folder for the two workdirs (emptied first)")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one untimed warm-up round")
  parser.add_argument("--json", type=Path, required=True)
  parser.add_argument("--settle-secs", type=float, default=SETTLE_SECS, help="pause before each timed call")
  args = parser.parse_args(argv)

  shutil.rmtree(args.root, ignore_errors=True)
  args.root.mkdir(parents=True)
  tree = states.make(args.state, scale=args.scale, deep_leaves=args.deep_leaves)
  leaves = jax.tree.leaves(tree)
  state = wrap(tree)
  sync = kd.ckpts.Checkpointer(workdir=args.root / "sync", save_interval_steps=1)
  async_ = kd.ckpts.Checkpointer(workdir=args.root / "async", save_interval_steps=1)

  samples: dict[str, list[float]] = {
    m: [] for m in ("save_s", "restore_s", "async_blocked_s", "async_durable_s", "save_user_s", "save_kernel_s")
  }
  for r in range(args.rounds + 1):
    got = one_round(sync, async_, state, tree, step=r + 1, root=args.root, settle_secs=args.settle_secs)
    if r == 0:
      continue  # warm-up: the first save creates Orbax's CheckpointManager and compiles
    for key, value in got.items():
      samples[key].append(value)
    print(f"round {r}/{args.rounds}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), file=sys.stderr)
  sync.close()
  async_.close()

  report = {
    "system": f"kauldron {importlib.metadata.version('kauldron')}",
    "state": args.state,
    "bytes": int(sum(x.nbytes for x in leaves)),
    "leaves": len(leaves),
    **samples,
    "versions": {name: importlib.metadata.version(name) for name in ("jax", "orbax-checkpoint", "tensorstore", "numpy", "flax")},
  }
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
