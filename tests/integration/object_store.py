"""End-to-end checks shared by the object-store tests (``s3://`` on moto, ``gs://`` on fake-gcs-server).

Each takes the run's URL, the environment a subprocess needs to reach the
local server, and (for the crash check) a function listing the run's object
keys; `test_s3.py` and `test_gcs.py` call them with their own servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np

import kckpt
from kckpt import _layout
from kckpt import _run
from tests.helpers import PYTHON, REPO, subprocess_env
from tests.programs.save_forever import state_for

EVAL_JOB = """
import sys, kckpt
ckpt = kckpt.Checkpointer.open(sys.argv[1])
print("READY", ckpt.latest_step, flush=True)
for step in ckpt.iter_new_checkpoints(timeout=1, timeout_fn=lambda: kckpt.trainer_finished(sys.argv[1])):
  print("EVAL", step, float(ckpt.restore(step=step)["w"][0]), flush=True)
print("DONE", flush=True)
"""


def eval_job_sees_every_step(workdir: str, env: Mapping[str, str]) -> None:
  """An eval job in another process, started before the first save, restores each of three steps in order."""
  job = subprocess.Popen(
    [PYTHON, "-c", EVAL_JOB, workdir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(**env)
  )
  try:
    ready = ""
    while not ready.startswith("READY"):  # skip the storage clients' log lines
      ready = job.stdout.readline()
      assert ready or job.poll() is None, "eval job exited early"
    assert ready.startswith("READY None"), ready
    with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None) as ckpt:
      for step in (10, 20, 30):
        ckpt.save({"w": np.full(2, float(step))}, step=step)
        ckpt.wait_until_finished()
    kckpt.write_end_marker(workdir, step=30)
    out, _ = job.communicate(timeout=120)
  finally:
    if job.poll() is None:
      job.kill()
      job.wait()
  assert job.returncode == 0, out
  evals = [line for line in out.splitlines() if line.startswith("EVAL")]
  assert evals == ["EVAL 10 10.0", "EVAL 20 20.0", "EVAL 30 30.0"], out
  assert "DONE" in out


def kill_during_save_exposes_no_partial_step(
  workdir: str, env: Mapping[str, str], keys: Callable[[], list[str]], *, lock_stale_secs: float | None = None
) -> None:
  """SIGKILL once part of step 2 is uploaded: no partial step is ever listed, and a new writer goes on.

  `keys()` lists the run's object keys, relative to `workdir`. With
  `lock_stale_secs`, the new writer takes over the dead one's lock after that
  long (where the lock is not released by a crash).
  """
  megabytes = 16
  proc = subprocess.Popen(
    [PYTHON, str(REPO / "tests" / "programs" / "save_forever.py"), workdir, str(megabytes), "async"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(**env),
  )
  lines = []
  try:
    while True:
      line = proc.stdout.readline()
      lines.append(line)
      if line.startswith("SAVING 2"):
        break
      assert line or proc.poll() is None, "saving program exited early:\n" + "".join(lines)
    # Kill once part of step 2 is in the bucket, before its commit marker.
    deadline = time.monotonic() + 60
    while not [k for k in keys() if k.startswith("checkpoints/ckpt_2/")]:
      assert time.monotonic() < deadline, "step 2 never started writing:\n" + "".join(lines)
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
  listing = _run.list_steps(_layout.checkpoints_dir(workdir))
  reader = kckpt.Checkpointer.open(workdir)
  steps = reader.all_steps
  assert steps and steps[0] == 1, (steps, listing)
  if 2 not in steps:  # the usual case: step 2 was cut short; it is there, unfinished and hidden
    assert "ckpt_2" in listing.unfinished, listing
  for step in steps:  # every reported step restores fully and bit-exactly
    expected = state_for(step, 1 if step == 1 else megabytes)
    restored = reader.restore({k: np.zeros(v.shape, np.float32) for k, v in expected.items()}, step=step)
    for key in expected:
      np.testing.assert_array_equal(restored[key], np.asarray(expected[key]))
  # A new trainer cleans up what the crash left and saves again.
  next_step = steps[-1] + 100
  extra = {} if lock_stale_secs is None else {"lock_stale_secs": lock_stale_secs}
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None, **extra) as writer:
    writer.save({"w": jnp.ones(3)}, step=next_step)
  after = _run.list_steps(_layout.checkpoints_dir(workdir))
  assert after.finished == (*steps, next_step) and after.unfinished == (), after
