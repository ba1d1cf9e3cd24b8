"""Test program: one process of a multi-process kckpt run (started by `tests.multiprocess.Cluster`).

Usage: python -m tests.programs.multihost_run SCENARIO

Scenarios (each process prints ``RESULT {json}`` lines that the test checks):

* ``save``: arrays sharded across every process; async `maybe_save` with
  retention, `wait_until_finished`, `latest_step`, restore onto the same
  mesh, another mesh shape and as NumPy; time-based saving decided by the
  primary's clock only.
* ``restore``: restores the run written by ``save`` (with however many
  processes this cluster has) onto this cluster's mesh.
* ``errors``: background saves that fail on one process (a write on process
  1, the final rename on process 0) are raised on every process, naming the
  step, at the next `maybe_save`, `wait_until_finished`, `save` and `close`.
* ``dies``: process 1 exits in the middle of the run; process 0's next
  `maybe_save` raises `ProcessTimeoutError` instead of hanging.
* ``local-reads``: every process calls `maybe_save` at every step (step and
  time intervals, metrics with a best metric, a tag), but only process 0 calls
  the reads (`latest_step`, `all_steps`, `should_save`, `metrics`,
  `best_step`, `step_details`, `retention`, `summary`) inside the loop, as a
  training script logs them; then every process restores ``-1``, ``"best"``
  and the tag.
* ``sigterm-no-check``: a loop that never looks at `reached_preemption`;
  process 1 gets SIGTERM at step 12. Every process saves step 13, then ends
  with status 143 at its next `maybe_save` (its ``finally`` reports first).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kckpt
from tests.programs import _cluster
from tests.programs._cluster import log, report

SHAPE = (16, 8)
RUN = "run"  # the run that `save` writes and `restore` reads, in the shared workdir


def values(step: int) -> np.ndarray:
  return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + step


def sharded(array: np.ndarray, sharding) -> jax.Array:
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def state_at(step: int, mesh: Mesh) -> dict:
  """A train state: sharded over both mesh axes, over one, replicated, and host-local leaves."""
  return {
    "params": {
      "w": sharded(values(step), NamedSharding(mesh, P(*mesh.axis_names))),
      "v": sharded(values(step)[:, 0], NamedSharding(mesh, P(mesh.axis_names))),
      "b": sharded(values(step)[0], NamedSharding(mesh, P())),
    },
    "step": np.int64(step),  # NumPy: the same on every process
    "count": jnp.asarray(step, jnp.int32),  # one device: host-local, treated as replicated
  }


def target_on(mesh: Mesh, spec_w, spec_v) -> dict:
  shape_dtype = lambda shape, spec: jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, spec))
  return {
    "params": {"w": shape_dtype(SHAPE, spec_w), "v": shape_dtype(SHAPE[:1], spec_v), "b": shape_dtype(SHAPE[1:], P())},
    "step": np.int64(0),
    "count": jnp.asarray(0, jnp.int32),
  }


def check_restored(restored: dict, step: int) -> bool:
  """Every shard this process holds has the values of `step`."""
  expected = {"w": values(step), "v": values(step)[:, 0], "b": values(step)[0]}
  for name, array in restored["params"].items():
    for shard in array.addressable_shards:
      if not np.array_equal(np.asarray(shard.data), expected[name][shard.index]):
        log(f"mismatch in {name} at {shard.index}")
        return False
  return int(restored["step"]) == step and int(restored["count"]) == step


def scenario_save(workdir: str) -> None:
  devices = np.array(jax.devices())
  mesh = Mesh(devices.reshape(jax.process_count(), -1), ("data", "model"))
  ckpt = kckpt.Checkpointer(
    workdir=os.path.join(workdir, RUN),
    save_interval_steps=3,
    max_to_keep=2,
    barrier_timeout_secs=60,
    async_timeout_secs=60,
  )
  saved = [s for s in range(13) if ckpt.maybe_save(state_at(s, mesh), step=s, metrics={"loss": 100.0 - s})]
  ckpt.wait_until_finished()
  report(saved=saved, all_steps=ckpt.all_steps, latest_step=ckpt.latest_step)

  same = ckpt.restore(target_on(mesh, P("data", "model"), P(("data", "model"))))
  other = Mesh(devices.reshape(2, -1), ("x", "y"))  # another mesh shape, other partitioning
  transposed = ckpt.restore(target_on(other, P("y", "x"), P("y")), step=9)
  as_numpy = ckpt.restore()
  report(
    same_mesh=check_restored(same, 12),
    other_mesh=check_restored(transposed, 9),
    other_mesh_shape=list(transposed["params"]["w"].sharding.mesh.devices.shape),
    numpy=bool(np.array_equal(as_numpy["params"]["w"], values(12)) and int(as_numpy["step"]) == 12),
  )
  ckpt.close()

  # Time-based saving: only the primary's clock decides. Here the primary's
  # interval always elapsed and the others' never does: all save the same steps.
  timed = kckpt.Checkpointer(
    workdir=os.path.join(workdir, "timed"),
    save_interval_steps=None,
    max_to_keep=None,
    save_interval_secs=0.001 if jax.process_index() == 0 else 1e9,
    barrier_timeout_secs=60,
  )
  timed_saved = []
  for s in range(4):
    time.sleep(0.01)
    if timed.maybe_save(state_at(s, mesh), step=s):
      timed_saved.append(s)
  timed.close()
  report(timed_saved=timed_saved, timed_steps=timed.all_steps)


def scenario_restore(workdir: str) -> None:
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("d",))
  ckpt = kckpt.Checkpointer(workdir=os.path.join(workdir, RUN), save_interval_steps=3, barrier_timeout_secs=60)
  restored = ckpt.restore(target_on(mesh, P("d"), P("d")))
  report(
    processes=jax.process_count(),
    latest_step=ckpt.latest_step,
    all_steps=ckpt.all_steps,
    restored=check_restored(restored, 12),
    restored_step=int(restored["step"]),
  )
  ckpt.close()


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------


def fail_writes_of(step: int) -> None:
  """Makes this process's array writes of `step` fail in the background (a storage fault)."""
  from orbax.checkpoint._src.serialization import jax_array_handlers

  original = jax_array_handlers._async_serialize_replica_slices

  async def serialize(values, infos, args, **kwargs):
    if f"ckpt_{step}." in str(infos[0].parent_dir):
      raise OSError(f"injected write failure on process {jax.process_index()}")
    return await original(values, infos, args, **kwargs)

  jax_array_handlers._async_serialize_replica_slices = serialize


def fail_rename_of(step: int) -> None:
  """Makes the primary's final rename of `step` fail (after every process wrote its part)."""
  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == f"ckpt_{step}":
      raise OSError("injected rename failure on process 0")
    return await original(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def describe(error: BaseException) -> dict:
  return {
    "type": type(error).__name__,
    "step": getattr(error, "step", None),
    "message": str(error),
    "cause": f"{type(error.__cause__).__name__}: {error.__cause__}" if error.__cause__ else None,
  }


def scenario_errors(workdir: str) -> None:
  pid = jax.process_index()
  mesh = Mesh(np.array(jax.devices()), ("d",))
  state = lambda s: {"w": sharded(values(s), NamedSharding(mesh, P("d"))), "step": np.int64(s)}
  if pid == 1:
    fail_writes_of(2)
    fail_writes_of(6)
  if pid == 0:
    fail_rename_of(4)
    fail_rename_of(8)
  ckpt = kckpt.Checkpointer(
    workdir=os.path.join(workdir, "errors"),
    save_interval_steps=1000,
    max_to_keep=None,
    barrier_timeout_secs=60,
    async_timeout_secs=60,
  )
  ckpt.save(state(1), step=1)
  ckpt.wait_until_finished()
  errors = {}

  # Step 2 fails on process 1: every process raises at the same maybe_save.
  ckpt.save(state(2), step=2)
  calls = 0
  try:
    for s in range(3, 100000):
      calls += 1
      ckpt.maybe_save(state(s), step=s)  # 1000-step interval: only the error can come out
      time.sleep(0.01)
  except kckpt.BackgroundSaveError as e:
    errors["maybe_save"] = describe(e)
  report(maybe_save_calls=calls)

  # Step 4 fails in the primary's rename: raised by wait_until_finished everywhere.
  ckpt.save(state(4), step=4)
  try:
    ckpt.wait_until_finished()
  except kckpt.BackgroundSaveError as e:
    errors["wait_until_finished"] = describe(e)

  # Step 6 fails on process 1 again: the next save raises before saving step 7.
  ckpt.save(state(6), step=6)
  try:
    ckpt.save(state(7), step=7)
  except kckpt.BackgroundSaveError as e:
    errors["save"] = describe(e)

  # Step 8 fails in the primary's rename: close raises.
  ckpt.save(state(8), step=8)
  try:
    ckpt.close()
  except kckpt.BackgroundSaveError as e:
    errors["close"] = describe(e)

  # The run goes on: the next save works, and only good steps exist.
  ckpt.save(state(9), step=9)
  ckpt.close()
  report(errors=errors, all_steps=kckpt.Checkpointer.open(os.path.join(workdir, "errors")).all_steps)


def scenario_dies(workdir: str) -> None:
  pid = jax.process_index()
  mesh = Mesh(np.array(jax.devices()), ("d",))
  state = lambda s: {"w": sharded(values(s), NamedSharding(mesh, P("d")))}
  ckpt = kckpt.Checkpointer(
    workdir=os.path.join(workdir, "dies"),
    save_interval_steps=2,
    barrier_timeout_secs=3,
    async_timeout_secs=30,
  )
  for s in range(100):
    if pid == 1 and s == 3:
      log("dying at step 3 while step 2 may still be saving")
      os._exit(17)
    try:
      ckpt.maybe_save(state(s), step=s)
    except kckpt.ProcessTimeoutError as e:
      report(timeout_at=s, error=str(e), processes=list(e.processes))
      # The cluster is broken: exit at once (JAX's shutdown would wait for the dead process).
      sys.stdout.flush()
      os._exit(0)
  report(timeout_at=None)


LOCAL_READS_STEPS = 9
LOCAL_READS_TAG = "mid"
LOCAL_READS_TAGGED = 4
LOCAL_READS_INTERVAL_SECS = 2.0  # process 0 sleeps past it after step 4: step 5 is saved by the time rule
LOSS = {0: 5.0, 2: 1.0, 4: 2.0, 6: 4.0, 8: 3.0}  # odd steps: 10 + step, never among the best


def local_reads_loss(step: int) -> float:
  return LOSS.get(step, 10.0 + step)


def scenario_local_reads(workdir: str) -> None:
  pid = jax.process_index()
  mesh = Mesh(np.array(jax.devices()), ("d",))
  state = lambda s: {"w": sharded(values(s), NamedSharding(mesh, P("d"))), "step": np.int64(s)}
  ckpt = kckpt.Checkpointer(
    workdir=os.path.join(workdir, "local_reads"),
    save_interval_steps=2,
    save_interval_secs=LOCAL_READS_INTERVAL_SECS,
    max_to_keep=3,
    best_metric_path="loss",
    best_mode="min",
    barrier_timeout_secs=10,  # a read that is a hidden collective fails in 10 s, not the cluster's timeout
    async_timeout_secs=30,
  )
  saved, reads = [], []
  for s in range(LOCAL_READS_STEPS):
    tag = LOCAL_READS_TAG if s == LOCAL_READS_TAGGED else None
    if ckpt.maybe_save(state(s), step=s, metrics={"loss": local_reads_loss(s)}, tag=tag):
      saved.append(s)
    if pid != 0:
      continue  # process 1 never reads
    if s == LOCAL_READS_TAGGED:
      time.sleep(LOCAL_READS_INTERVAL_SECS + 0.5)  # the time rule is due at the next step (primary's clock)
    # As a training script logs them: on process 0 only, while saves are in flight.
    latest = ckpt.latest_step
    row = {
      "step": s,
      "latest_step": latest,
      "all_steps": ckpt.all_steps,
      "should_save_next": ckpt.should_save(s + 1),
      "best_step": ckpt.best_step,
      "retention": [[d.step, d.keep] for d in ckpt.retention()],
      "summary_lines": len(ckpt.summary().splitlines()),
    }
    if latest is not None:  # with no finished step yet, step -1 names nothing
      details = ckpt.step_details()
      row.update(metrics=ckpt.metrics(), details_step=details.step, details_tag=details.tag)
    reads.append(row)
    log(f"step {s}: {row}")
  report(saved=saved)
  if pid == 0:
    report(reads=reads)

  restored = {}
  for name in (-1, "best", LOCAL_READS_TAG):
    tree = ckpt.restore(step=name)  # as NumPy: the whole array on every process
    got = ckpt.last_restore_stats.step
    restored[str(name)] = {
      "step": got,
      "step_leaf": int(tree["step"]),
      "w00": float(tree["w"][0, 0]),
      "matches": bool(np.array_equal(tree["w"], values(got))),
    }
  report(restored=restored)
  ckpt.close()


def scenario_sigterm_no_check(workdir: str) -> None:
  import signal  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.array(jax.devices()).reshape(jax.process_count(), -1), ("hosts", "local"))
  ckpt = kckpt.Checkpointer(
    workdir=os.path.join(workdir, "sigterm"), save_interval_steps=10, barrier_timeout_secs=30, async_save=True
  )
  trained = []
  try:
    for step in range(60):
      trained.append(step)
      ckpt.maybe_save(state_at(step, mesh), step=step)
      if step == 12 and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
  finally:
    report(trained=trained)
    ckpt.close()


def main() -> None:
  scenario = sys.argv[1]
  _cluster.init()
  scenarios = {
    "save": scenario_save,
    "restore": scenario_restore,
    "errors": scenario_errors,
    "dies": scenario_dies,
    "local-reads": scenario_local_reads,
    "sigterm-no-check": scenario_sigterm_no_check,
  }
  scenarios[scenario](_cluster.workdir())
  log("done")


if __name__ == "__main__":
  main()
