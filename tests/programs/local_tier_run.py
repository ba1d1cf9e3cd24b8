"""Test program: one process of a run with a local tier (started by `tests.multiprocess.Cluster`).

Usage: python -m tests.programs.local_tier_run SCENARIO

* ``train``: arrays sharded across every process; `maybe_save` every step,
  the persistent tier every 10 steps, the local tier (one folder per process,
  ``local/host{process_index}``, one peer copy) every 2; after step 17 the
  saves are made durable and the process ends at once (``os._exit``: no
  `close`), as a crash would (JAX's cluster is shut down first, so that
  process 0's exit does not abort the others).
* ``fails``: the local folder of process 1 cannot be made; every process
  raises the same `BackgroundSaveError` at its next local save.
* ``exit``: the copy to peers cut in chunks of 4 KiB; a restore, then
  steps 0-10; reports after each `maybe_save` how far the copy in flight has
  got, then ends without `wait_until_finished` or `close` (a plain
  interpreter exit) with both tiers' saves of step 10 in flight.
* ``zeros``: process 1 cannot place chunk 5 of its copy of step 2; every
  process raises at its next local save, and no folder commits step 2.
* ``crash_mid_copy``: as ``train`` to step 18, whose local save has only
  dispatched the first chunks of its copy to peers when every process ends.
* ``peer_dies``: process 1 ends with the copy of step 2 in flight; process
  0 reports what `wait_until_finished` raised.
* ``resume``: a new process restores ``-1`` into a target on this cluster's
  mesh, as a resumed training does, and reports the step, the tier it came
  from and whether every shard holds that step's values bit for bit.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kckpt
from kckpt import _local_format
from kckpt import _peers
from tests.programs import _cluster
from tests.programs import multihost_run
from tests.programs._cluster import report
from tests.programs.multihost_run import sharded

# Chunks of the copy to peers in the scenarios that watch it move: 4 KiB (XLA's CPU client runs a smaller
# one in the caller's thread, see kckpt._peers), so that the 64 KiB "pad" leaf makes a few dozen of them.
CHUNK = 4096
PAD_SHAPE = (128, 128)


def pad(step: int) -> np.ndarray:
  return np.arange(np.prod(PAD_SHAPE), dtype=np.float32).reshape(PAD_SHAPE) * 0.5 + step


def state_at(step: int, mesh: Mesh) -> dict:
  """`multihost_run.state_at` and a 64 KiB leaf sharded over every device."""
  return {**multihost_run.state_at(step, mesh), "pad": sharded(pad(step), NamedSharding(mesh, P("d")))}


def target(mesh: Mesh) -> dict:
  spec = jax.ShapeDtypeStruct(PAD_SHAPE, np.float32, sharding=NamedSharding(mesh, P("d")))
  return {**multihost_run.target_on(mesh, P("d"), P("d")), "pad": spec}


def check_restored(restored: dict, step: int) -> bool:
  """Every shard this process holds has the values of `step`."""
  pad_exact = all(np.array_equal(np.asarray(s.data), pad(step)[s.index]) for s in restored["pad"].addressable_shards)
  return pad_exact and multihost_run.check_restored(restored, step)


def checkpointer(workdir: str, local: str = "local", timeout: float = 60) -> kckpt.Checkpointer:
  return kckpt.Checkpointer(
    workdir=os.path.join(workdir, "run"),
    save_interval_steps=10,
    max_to_keep=None,
    local_workdir=os.path.join(workdir, local, "host{process_index}"),
    local_save_interval_steps=2,
    barrier_timeout_secs=timeout,
  )


def save_until_it_raises(ckpt: kckpt.Checkpointer) -> dict | None:
  """`maybe_save` of steps 1-5 until a `BackgroundSaveError`: which step raised, for which step, and why."""
  mesh = Mesh(np.array(jax.devices()), ("d",))
  try:
    for step in range(1, 6):
      ckpt.maybe_save(state_at(step, mesh), step=step)
  except kckpt.BackgroundSaveError as e:
    return {"step_at_raise": step, "error_step": e.step, "message": str(e)}
  return None


def scenario_train(workdir: str) -> None:
  mesh = Mesh(np.array(jax.devices()), ("d",))
  ckpt = checkpointer(workdir)
  for step in range(18):
    ckpt.maybe_save(state_at(step, mesh), step=step)
  ckpt.wait_until_finished()
  report(all_steps=ckpt.all_steps, local_steps=ckpt.local_steps, folders=sorted(os.listdir(os.path.join(workdir, "local"))))
  sys.stdout.flush()
  if jax.process_count() > 1:  # the cluster itself ends cleanly (else process 0's exit aborts the others)...
    jax.distributed.shutdown()
  os._exit(0)  # ...but kckpt sees a crash right after step 17: nothing closed


def scenario_crash_mid_copy(workdir: str) -> None:
  """As ``train``, then step 18's local save starts and every process ends at once, its copy to peers part-way."""
  _peers.CHUNK_BYTES = CHUNK
  mesh = Mesh(np.array(jax.devices()), ("d",))
  ckpt = checkpointer(workdir)
  for step in range(19):
    ckpt.maybe_save(state_at(step, mesh), step=step)
  copy = ckpt._rt.local_tier._pending.copy  # pylint: disable=protected-access  # the copy of step 18
  report(dispatched=copy.dispatched, chunks=copy.chunks)
  sys.stdout.flush()
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  os._exit(0)  # a crash with the copy of step 18 in flight


def scenario_resume(workdir: str) -> None:
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("LOG %(levelname)s %(message)s"))
  logging.getLogger("kckpt").addHandler(handler)
  logging.getLogger("kckpt").setLevel(logging.INFO)
  mesh = Mesh(np.array(jax.devices()), ("d",))
  ckpt = checkpointer(workdir)
  restored = ckpt.restore(target(mesh), noop_if_missing=True)
  step = int(restored["step"])
  stats = ckpt.last_restore_stats
  report(step=step, tier=stats.tier if stats else None, exact=check_restored(restored, step), all_steps=ckpt.all_steps)
  ckpt.close()


def scenario_exit(workdir: str) -> None:
  """The copy to peers goes on over the next `maybe_save` calls, and is finished at exit.

  As a resumed run does, it first restores (nothing there yet), then saves
  steps 0-10; the last call starts both tiers' saves of step 10.
  """
  _peers.CHUNK_BYTES = CHUNK
  mesh = Mesh(np.array(jax.devices()), ("d",))
  ckpt = checkpointer(workdir)
  ckpt.restore(target(mesh), noop_if_missing=True)
  progress = []
  for step in range(11):
    ckpt.maybe_save(state_at(step, mesh), step=step)
    copy = ckpt._rt.local_tier._pending.copy  # pylint: disable=protected-access  # the copy in flight
    progress.append({"step": step, "dispatched": copy.dispatched, "chunks": copy.chunks})
  report(progress=progress, in_flight=_peers.IN_FLIGHT)
  # No wait_until_finished, no close: the exit finishes both saves of step 10.


class _FailingChunk(np.ndarray):
  """A packed buffer whose chunk 5 of the copy to peers cannot be read (as a device out of memory would fail it)."""

  def __getitem__(self, key):
    if isinstance(key, slice) and (key.start, key.stop) == (5 * CHUNK, 6 * CHUNK):
      raise MemoryError("injected: chunk 5 cannot be placed")
    return super().__getitem__(key)


def scenario_zeros(workdir: str) -> None:
  """Process 1 cannot place chunk 5 of its copy at step 2: it sends zeros; both raise, and no folder commits step 2."""
  _peers.CHUNK_BYTES = CHUNK
  pack = _local_format.pack
  if jax.process_index() == 1:
    _local_format.pack = lambda *a, **k: pack(*a, **k).view(_FailingChunk) if k["step"] == 2 else pack(*a, **k)
  ckpt = checkpointer(workdir)
  report(caught=save_until_it_raises(ckpt), local_steps=ckpt.local_steps)
  ckpt.close()


def scenario_peer_dies(workdir: str) -> None:
  """Process 1 dies with the copy of step 2 in flight: process 0 raises within its timeout instead of hanging."""
  _peers.CHUNK_BYTES = CHUNK
  mesh = Mesh(np.array(jax.devices()), ("d",))
  ckpt = checkpointer(workdir, timeout=5)
  for step in range(3):
    ckpt.maybe_save(state_at(step, mesh), step=step)
  if jax.process_index() == 1:
    os._exit(0)  # a crash: nothing closed, the cluster not shut down
  caught = None
  try:
    ckpt.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-exception-caught  # reported to the test
    caught = f"{type(e).__name__}: {e}"
  report(caught=caught)
  os._exit(0)  # the cluster cannot be shut down cleanly without process 1


def scenario_fails(workdir: str) -> None:
  """Process 1's local folder cannot be made (the test put a file there): every process raises, none hangs.

  The copy to peers is cut in chunks of 4 KiB, so that most of it is still
  to move when process 1's write fails (before it collected any chunk).
  """
  _peers.CHUNK_BYTES = CHUNK
  ckpt = checkpointer(workdir, local="broken")
  report(caught=save_until_it_raises(ckpt))
  ckpt.close()


if __name__ == "__main__":
  _cluster.init()
  scenarios = {
    "train": scenario_train,
    "resume": scenario_resume,
    "fails": scenario_fails,
    "exit": scenario_exit,
    "zeros": scenario_zeros,
    "peer_dies": scenario_peer_dies,
    "crash_mid_copy": scenario_crash_mid_copy,
  }
  scenarios[sys.argv[1]](_cluster.workdir())
