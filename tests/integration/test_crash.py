"""A process killed with SIGKILL in the middle of a save loses nothing finished.

Each trial runs tests/programs/save_forever.py (a trainer that saves a 96 MB state step
after step) and kills it while a step is being written: the test watches the step's
temporary folder (``ckpt_<n>.orbax-checkpoint-tmp``) fill up, freezes the trainer with
SIGSTOP once the folder holds the trial's share of the state, looks again (the trainer
cannot move on while stopped) and only then sends SIGKILL. A look that finds no such
folder resumes the trainer (SIGCONT) and waits for a later moment, so every trial really
kills mid-save, and checks afterwards that the temporary folder outlived the process.
"""

import dataclasses
import os
import re
import signal
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt import _run
from tests.helpers import PYTHON, REPO, Output, subprocess_env
from tests.programs.save_forever import state_for

PROGRAM = REPO / "tests" / "programs" / "save_forever.py"
MEGABYTES = 96
TEMPORARY = re.compile(r"ckpt_(\d+)\.orbax-checkpoint-tmp")


@dataclasses.dataclass(frozen=True)
class SaveInProgress:
  name: str  # the step's temporary folder
  step: int
  nbytes: int  # bytes written to it so far


def saves_in_progress(checkpoints):
  """The step folders being written (or left by a crash), with the bytes in each."""
  try:
    names = os.listdir(checkpoints)
  except FileNotFoundError:
    return {}
  found = {}
  for name in names:
    match = TEMPORARY.match(name)
    if match is None:
      continue
    nbytes = 0
    for root, _, files in os.walk(checkpoints / name):  # a save under way changes the folder: skip what vanished
      for file in files:
        try:
          nbytes += os.path.getsize(os.path.join(root, file))
        except FileNotFoundError:
          pass
    found[name] = SaveInProgress(name=name, step=int(match.group(1)), nbytes=nbytes)
  return found


def kill_point(checkpoints, output, mode, min_bytes):
  """A save of step >= 2 under way whose temporary folder holds `min_bytes`; None if there is none now.

  Async: also after the trainer was told the save had started ("STARTED n": `save()` returned and
  the step is written in the background while the training loop goes on).
  """
  for save in saves_in_progress(checkpoints).values():
    if save.step >= 2 and save.nbytes >= min_bytes and (mode == "sync" or output.has(f"STARTED {save.step}")):
      return save
  return None


def wait_stopped(proc):
  _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once every thread of the program is stopped
  if not os.WIFSTOPPED(status):
    proc.returncode = os.waitstatus_to_exitcode(status)
    raise AssertionError(f"the saving program exited ({proc.returncode}) instead of stopping")


def run_and_kill(workdir, mode, min_bytes, megabytes=MEGABYTES):
  """Runs the saving program and SIGKILLs it mid-save; returns (the save it killed, the program's output)."""
  proc = subprocess.Popen(
    [PYTHON, str(PROGRAM), str(workdir), str(megabytes), mode],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  output = Output(proc.stdout)
  checkpoints = workdir / "checkpoints"
  killed = None
  try:
    output.wait_for("SAVED 1")
    deadline = time.monotonic() + 120
    while killed is None:
      assert time.monotonic() < deadline, f"no save reached {min_bytes} bytes in 120 s:\n{output.text()}"
      assert proc.poll() is None, f"the saving program exited ({proc.returncode}):\n{output.text()}"
      if kill_point(checkpoints, output, mode, min_bytes) is None:
        time.sleep(0.002)  # the interval between two looks at the folder (the loop has a deadline)
        continue
      os.kill(proc.pid, signal.SIGSTOP)
      wait_stopped(proc)
      killed = kill_point(checkpoints, output, mode, min_bytes)  # frozen: what the kill will leave
      os.kill(proc.pid, signal.SIGKILL if killed else signal.SIGCONT)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    output.join()
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL, output.text()
  return killed, output


def durable_steps(output, mode):
  """The steps the program was told were durable before it was killed."""
  if mode == "sync":
    return {int(line.split()[1]) for line in output.lines if line.startswith("SAVED ")}
  # Async: save(n) returns only once step n - 1 is durable.
  return {1} | {int(line.split()[1]) - 1 for line in output.lines if line.startswith("STARTED ")}


def check_kill_during_save(tmp_path, mode, progress):
  """Kills a trainer once the step it is saving holds `progress` of its bytes (0: the folder exists)."""
  workdir = tmp_path / "run"
  checkpoints = workdir / "checkpoints"
  min_bytes = int(progress * MEGABYTES * 1024 * 1024)
  killed, output = run_and_kill(workdir, mode, min_bytes)
  # The kill came mid-save: the step's temporary folder outlived the process, as full as seen.
  left = saves_in_progress(checkpoints)
  assert killed.name in left and left[killed.name].nbytes >= min_bytes, (killed, left)
  listing = _run.list_steps(checkpoints)
  assert killed.name in listing.unfinished, listing
  if mode == "sync":
    assert f"SAVED {killed.step}" not in output.lines  # save() had not returned
  reader = kckpt.Checkpointer.open(workdir)
  steps = reader.all_steps
  # No unfinished step is reported and nothing finished is lost: steps are saved one after
  # another, so steps 1 .. n - 1 are durable once step n is being written.
  assert steps == list(range(1, killed.step)), (steps, killed, listing)
  assert durable_steps(output, mode) <= set(steps), output.text()
  # Every reported step restores fully and bit-exactly.
  for step in steps:
    expected = state_for(step, 1 if step == 1 else MEGABYTES)
    restored = reader.restore({k: np.zeros(v.shape, np.float32) for k, v in expected.items()}, step=step)
    for key in expected:
      np.testing.assert_array_equal(restored[key], np.asarray(expected[key]))
  # A new trainer cleans up what the crash left and saves again.
  writer = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  next_step = steps[-1] + 100
  writer.save({"w": jnp.ones(3)}, step=next_step)
  writer.close()
  names = os.listdir(checkpoints)
  assert not [n for n in names if "tmp" in n], names
  assert kckpt.Checkpointer.open(workdir).all_steps == steps + [next_step]


# progress 1.0: every array byte is in the temporary folder; the save is committing (fsync, rename).
@pytest.mark.parametrize("mode, progress", [("async", 0.0), ("sync", 0.5), ("async", 1.0)])
def test_kill_during_save_leaves_no_partial_step(tmp_path, mode, progress):
  check_kill_during_save(tmp_path, mode, progress)


STRESS_TRIALS = [("async" if i % 2 else "sync", round(i / 19, 2)) for i in range(20)]


@pytest.mark.slow
@pytest.mark.parametrize("mode, progress", STRESS_TRIALS, ids=[f"{m}-{p}" for m, p in STRESS_TRIALS])
def test_kill_stress(tmp_path, mode, progress):
  """20 kills spread over the whole save (from its first byte to its commit), async and sync."""
  check_kill_during_save(tmp_path, mode, progress)


def test_a_script_that_ends_right_after_an_async_save_exits_and_keeps_the_step(tmp_path):
  # No close(), no wait_until_finished(): the interpreter's exit finishes the save in flight.
  code = (
    "import sys, numpy as np, kckpt\n"
    "ckpt = kckpt.Checkpointer(workdir=sys.argv[1], save_interval_steps=1)\n"
    "for step in range(3):\n"
    "  ckpt.save({'w': np.full(100_000, float(step))}, step=step)\n"
  )
  proc = subprocess.run(
    [PYTHON, "-c", code, str(tmp_path)], env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  reader = kckpt.Checkpointer.open(tmp_path)
  assert reader.all_steps == [0, 1, 2]
  np.testing.assert_array_equal(reader.restore()["w"], np.full(100_000, 2.0))
