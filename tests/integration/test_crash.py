"""A process killed with SIGKILL in the middle of a save loses nothing finished."""

import os
import signal
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from tests.helpers import PYTHON, REPO, subprocess_env
from tests.programs.save_forever import state_for

PROGRAM = REPO / "tests" / "programs" / "save_forever.py"


def run_and_kill(workdir, mode, delay, megabytes=96):
  proc = subprocess.Popen(
    [PYTHON, str(PROGRAM), str(workdir), str(megabytes), mode],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  try:
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
      line = proc.stdout.readline()
      lines.append(line)
      if line.startswith("SAVING 2"):
        break
      if not line and proc.poll() is not None:
        raise AssertionError("saving program exited early:\n" + "".join(lines))
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode, delay", [("async", 0.0), ("async", 0.3), ("sync", 0.1)])
def test_kill_during_save_leaves_no_partial_step(tmp_path, mode, delay):
  workdir = tmp_path / "run"
  run_and_kill(workdir, mode, delay)
  reader = kckpt.Checkpointer.open(workdir)
  steps = reader.all_steps
  assert steps and steps[0] == 1
  # Every reported step restores fully and bit-exactly.
  for step in steps:
    megabytes = 1 if step == 1 else 96
    expected = state_for(step, megabytes)
    restored = reader.restore({k: np.zeros(v.shape, np.float32) for k, v in expected.items()}, step=step)
    for key in expected:
      np.testing.assert_array_equal(restored[key], np.asarray(expected[key]))
  # A new trainer cleans up what the crash left and saves again.
  writer = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  next_step = steps[-1] + 100
  writer.save({"w": jnp.ones(3)}, step=next_step)
  writer.close()
  names = os.listdir(workdir / "checkpoints")
  assert not [n for n in names if "tmp" in n], names
  assert kckpt.Checkpointer.open(workdir).all_steps == steps + [next_step]


STRESS_TRIALS = [("async" if i % 2 else "sync", round(0.05 * i, 2)) for i in range(20)]


@pytest.mark.slow
@pytest.mark.parametrize("mode, delay", STRESS_TRIALS, ids=[f"{m}-{d}s" for m, d in STRESS_TRIALS])
def test_kill_stress(tmp_path, mode, delay):
  """20 kills spread over the whole save (0 to 1 s after it starts), async and sync."""
  test_kill_during_save_leaves_no_partial_step(tmp_path, mode, delay)
