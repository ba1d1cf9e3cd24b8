"""Polling a run that is being written: cheap, and never shows an unfinished step."""

import os
import subprocess
import time

import jax.numpy as jnp
import numpy as np

import kckpt
from kckpt import _run
from tests.helpers import PYTHON, REPO, subprocess_env


def test_polling_never_reports_an_unfinished_step(tmp_path):
  writer = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1)
  writer.save({"w": jnp.ones(4)}, step=1)
  writer.wait_until_finished()
  reader = kckpt.Checkpointer.open(tmp_path)
  big = {f"w{i}": jnp.full((8 * 1024 * 1024,), float(i)) for i in range(4)}  # 128 MB
  writer.save(big, step=2)
  saw_unfinished = False
  while True:
    reader.reload()
    finished_now = reader.all_steps
    names = os.listdir(tmp_path / "checkpoints")
    if any("tmp" in n for n in names):
      saw_unfinished = True
      assert finished_now == [1], (finished_now, names)
    if finished_now == [1, 2]:
      break
    time.sleep(0.005)
  writer.wait_until_finished()
  assert saw_unfinished  # the poll did run while the step was being written
  listing = _run.list_steps(tmp_path / "checkpoints")
  assert listing.finished == (1, 2) and listing.unfinished == ()
  restored = reader.restore({k: np.zeros(v.shape, np.float32) for k, v in big.items()})
  np.testing.assert_array_equal(restored["w3"], np.full((8 * 1024 * 1024,), 3.0, np.float32))


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
  try:
    first = watcher.stdout.readline()  # the watcher is up: it printed the (empty) summary
    assert "0 step(s)" in first, first
    with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, max_to_keep=None) as ckpt:
      for step in (10, 20):
        ckpt.save({"w": np.ones(2)}, step=step, metrics={"loss": step / 10})
        ckpt.wait_until_finished()
        time.sleep(0.3)
    kckpt.write_end_marker(tmp_path, step=20)
    out, _ = watcher.communicate(timeout=60)
  finally:
    if watcher.poll() is None:
      watcher.kill()
      watcher.wait()
  assert watcher.returncode == 0, out
  assert "new step 10" in out and "new step 20" in out and "{'loss': 2.0}" in out
  assert "latest step: 20; finished: True" in out
