"""Polling a run that is being written: cheap, and never shows an unfinished step."""

import os
import re
import subprocess
import time

import numpy as np

import kckpt
from kckpt import _run
from tests.helpers import PYTHON, REPO, Output, subprocess_env
from tests.programs.save_forever import state_for

TEMPORARY = re.compile(r"ckpt_(\d+)\.orbax-checkpoint-tmp")


def steps_being_written(checkpoints):
  return {int(m.group(1)) for m in map(TEMPORARY.match, os.listdir(checkpoints)) if m}


def test_polling_never_reports_an_unfinished_step(tmp_path):
  """A reader polls a live writer (another process saving 32 MB steps back to back)."""
  megabytes = 32
  writer = subprocess.Popen(
    [PYTHON, str(REPO / "tests" / "programs" / "save_forever.py"), str(tmp_path), str(megabytes), "async"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  output = Output(writer.stdout)
  try:
    output.wait_for("SAVED 1")
    reader = kckpt.Checkpointer.open(tmp_path)
    watched = None  # the first step a poll saw being written: the loop ends when a poll sees it finished
    finished_now, polls = [], 0
    deadline = time.monotonic() + 120
    while watched is None or watched not in finished_now:
      assert time.monotonic() < deadline, f"no step was seen being written, then finished, in 120 s (polls: {polls})"
      assert writer.poll() is None, "the writer exited:\n" + output.text()
      polls += 1
      reader.reload()
      finished_now = reader.all_steps
      # Listed after the reload: a step being written now was not finished at the reload either.
      being_written = steps_being_written(tmp_path / "checkpoints")
      assert not being_written & set(finished_now), (finished_now, being_written)
      assert finished_now == list(range(1, len(finished_now) + 1)), finished_now  # whole steps, in order
      if watched is None and being_written:
        watched = min(being_written)
      time.sleep(0.005)  # the interval between two polls (the loop has a deadline)
  finally:
    if writer.poll() is None:
      writer.kill()
    writer.wait(timeout=30)
    output.join()
    writer.stdout.close()
  listing = _run.list_steps(tmp_path / "checkpoints")
  assert set(listing.finished) >= set(finished_now)
  assert {int(TEMPORARY.match(n).group(1)) for n in listing.unfinished} <= {max(listing.finished) + 1}, listing
  reader.reload()
  assert reader.all_steps == list(listing.finished)  # the step the writer was killed in is not reported
  expected = state_for(watched, megabytes)
  restored = reader.restore({k: np.zeros(v.shape, np.float32) for k, v in expected.items()}, step=watched)
  for key in expected:
    np.testing.assert_array_equal(restored[key], np.asarray(expected[key]))


def test_listing_reads_no_per_step_file(tmp_path):
  writer = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, max_to_keep=None)
  for s in range(3):
    writer.save({"w": np.ones(2)}, step=s, metrics={"loss": 1.0})
  writer.close()
  # Make every per-step file unreadable garbage: listing must not care.
  for step in range(3):
    (tmp_path / "checkpoints" / f"ckpt_{step}" / "_CHECKPOINT_METADATA").write_text("garbage{")
    (tmp_path / "checkpoints" / f"ckpt_{step}" / "metrics" / "metrics").write_text("garbage{")
  reader = kckpt.Checkpointer.open(tmp_path)
  assert reader.all_steps == [0, 1, 2] and reader.latest_step == 2
  reader.reload()
  assert reader.latest_step == 2


def test_watch_run_example_follows_a_live_run(tmp_path):
  watcher = subprocess.Popen(
    [PYTHON, str(REPO / "examples" / "watch_run.py"), "--workdir", str(tmp_path), "--seconds", "60", "--poll", "0.05"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  output = Output(watcher.stdout)
  try:
    output.wait_for("step(s)")  # the watcher is up: it printed the (empty) summary
    assert "0 step(s)" in output.lines[0], output.text()
    with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, max_to_keep=None) as ckpt:
      for step in (10, 20):
        ckpt.save({"w": np.ones(2)}, step=step, metrics={"loss": step / 10})
        ckpt.wait_until_finished()
        # The watcher reports each step while the run goes on (before the end marker is written).
        assert f"metrics {{'loss': {step / 10}}}" in output.wait_for(f"new step {step}:")
    kckpt.write_end_marker(tmp_path, step=20)
    watcher.wait(timeout=60)
  finally:
    if watcher.poll() is None:
      watcher.kill()
      watcher.wait()
    output.join()
    watcher.stdout.close()
  out = output.text()
  assert watcher.returncode == 0, out
  assert out.splitlines()[-1] == "latest step: 20; finished: True", out
