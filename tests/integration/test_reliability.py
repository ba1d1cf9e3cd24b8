"""Faults and bad input: nothing finished is ever lost, and every error says what is wrong."""

import glob
import json
import os
import shutil
import socket
import subprocess
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt import items
from kckpt import lock as lock_lib
from tests.conftest import snapshot
from tests.helpers import PYTHON, REPO, subprocess_env


def two_step_run(workdir, **kwargs):
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None, **kwargs) as ckpt:
    for step in (1, 2):
      ckpt.save({"w": jnp.arange(1000.0) + step, "b": jnp.ones(10)}, step=step)
  return workdir / "checkpoints" / "ckpt_2" / "default"


def target():
  return {"w": jnp.zeros(1000), "b": jnp.zeros(10)}


# -- Reader vs writer -----------------------------------------------------------------


def test_reader_never_crashes_while_the_writer_deletes_under_it(tmp_path):
  num_steps = 150
  writer = subprocess.Popen(
    [PYTHON, str(REPO / "tests" / "programs" / "save_every_step.py"), str(tmp_path), str(num_steps)],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  reader = kckpt.Checkpointer.open(tmp_path)
  restored, skipped, polls = [], [], 0
  deadline = time.monotonic() + 240
  try:
    while not kckpt.trainer_finished(tmp_path) and time.monotonic() < deadline:
      polls += 1
      reader.reload()
      step = reader.latest_step
      if step is None:
        time.sleep(0.01)
        continue
      try:
        value = reader.restore({"w": np.zeros((64, 64), np.float32)}, step=step)["w"]
      except kckpt.CheckpointNotFoundError as e:
        warnings.warn(f"step {step} was deleted before it could be read: {e}", stacklevel=2)
        skipped.append(step)
        continue
      assert np.all(value == float(step)), step  # a whole, correct step or none
      restored.append(step)
    out, _ = writer.communicate(timeout=120)
  finally:
    if writer.poll() is None:
      writer.kill()
      writer.wait()
  assert writer.returncode == 0 and "DONE" in out, out
  assert kckpt.trainer_finished(tmp_path)
  assert len(restored) > 10 and polls >= len(restored)
  assert restored == sorted(restored)
  reader.reload()
  assert reader.all_steps == [num_steps - 1, num_steps]


# -- Corruption ----------------------------------------------------------------------------


def _data_file(item_dir):
  files = [p for p in glob.glob(f"{item_dir}/**/d/*", recursive=True) if os.path.getsize(p) > 1000]
  assert files, "expected array data files"
  return files[0]


@pytest.mark.parametrize(
  "fault, expected",
  [
    ("truncate", r"Cannot read step 2, item 'default' .*unreadable leaves \['w'\]"),
    # Compressed chunks: zstd checks its frames. In kckpt's default uncompressed format the
    # step's CRC32Cs catch overwritten data (tests/test_integrity.py).
    ("overwrite compressed", r"Cannot read step 2, item 'default' .*unreadable leaves \['w'\]"),
    ("delete _METADATA", r"Cannot read step 2, item 'default' .*_METADATA"),
    ("garbage folder", r"Cannot read step 2 .*ckpt_2 holds no checkpoint item"),
  ],
)
def test_corruption_names_step_item_and_file_and_listing_still_works(tmp_path, fault, expected):
  storage = kckpt.StorageOptions(compression=True) if fault == "overwrite compressed" else kckpt.StorageOptions()
  item_dir = two_step_run(tmp_path, storage=storage)
  if fault == "truncate":
    with open(_data_file(item_dir), "r+b") as f:
      f.truncate(100)
  elif fault == "overwrite compressed":
    path = _data_file(item_dir)
    with open(path, "wb") as f:
      f.write(os.urandom(os.path.getsize(path) or 4096))
  elif fault == "delete _METADATA":
    os.remove(item_dir / "_METADATA")
  else:
    shutil.rmtree(item_dir.parent)
    item_dir.parent.mkdir()
    (item_dir.parent / "junk.bin").write_bytes(b"\x00garbage")
  reader = kckpt.Checkpointer.open(tmp_path)
  with pytest.raises(kckpt.CheckpointReadError, match=expected) as info:
    reader.restore(target())
  assert info.value.step == 2
  assert reader.latest_step == 2 and reader.all_steps == [1, 2]
  np.testing.assert_array_equal(reader.restore(target(), step=1)["w"], np.arange(1000.0) + 1)


# -- Failing storage, failing items -----------------------------------------------------------


class Exploding(items.CheckpointItem):
  format = "json"

  def checkpoint_value(self):
    raise OSError("the data source failed")

  def from_restored(self, value):
    return value


def test_an_item_whose_write_raises_changes_nothing(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save({"w": jnp.ones(3)}, step=1)
  ckpt.wait_until_finished()
  before = snapshot(workdir / "checkpoints")
  with pytest.raises(OSError, match="the data source failed"):
    ckpt.save(items.Composite(w=jnp.ones(3), iterator=Exploding()), step=2)
  assert snapshot(workdir / "checkpoints") == before
  assert ckpt.all_steps == [1]


# -- Concurrent trainers ----------------------------------------------------------------------


def test_second_live_writer_is_refused(tmp_path):
  holder = subprocess.Popen(
    [
      PYTHON,
      "-c",
      "import sys, time, kckpt, numpy as np\n"
      "c = kckpt.Checkpointer(workdir=sys.argv[1], save_interval_steps=1)\n"
      "c.save({'w': np.ones(2)}, step=1); c.wait_until_finished(); print('HOLDING', flush=True); time.sleep(120)",
      str(tmp_path),
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=subprocess_env(),
  )
  try:
    line = ""
    while "HOLDING" not in line:
      line = holder.stdout.readline()
      assert line or holder.poll() is None, "holder exited"
    before = snapshot(tmp_path / "checkpoints")
    second = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, max_to_keep=1)
    with pytest.raises(kckpt.ConcurrentWriterError, match=rf"process {holder.pid} on host"):
      second.save({"w": np.ones(2)}, step=2)
    with pytest.raises(kckpt.ConcurrentWriterError):
      second.delete(1)
    after = snapshot(tmp_path / "checkpoints")
    after.pop("WRITER_LOCK.json")
    before.pop("WRITER_LOCK.json")
    assert after == before  # the first writer's steps are untouched
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  # Once the holder is dead, a new writer takes over at once (same host).
  third = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1)
  assert third.save({"w": np.ones(2)}, step=2)
  third.close()
  assert not (tmp_path / "checkpoints" / "WRITER_LOCK.json").exists()


def _fake_remote_lock(checkpoints, mtime=None):
  """A lock file of a writer on another host; `mtime`: the time of its last refresh (default: now)."""
  checkpoints.mkdir(parents=True, exist_ok=True)
  path = checkpoints / lock_lib.LOCK_FILE
  path.write_text(json.dumps({"host": "other-" + socket.gethostname(), "pid": 1, "token": "remote"}))
  if mtime is not None:
    os.utime(path, (mtime, mtime))
  return path


def test_writer_on_another_host_blocks_while_alive_and_is_taken_over_when_stale(tmp_path):
  # A live writer elsewhere refreshes its lock all the time. Its last refresh is dated an hour
  # ahead (as a clock running ahead on its host would): the lock stays fresh for the whole
  # wait whatever the load, where a refresh thread could be late and let the lock go stale.
  live_lock = _fake_remote_lock(tmp_path / "live" / "checkpoints", mtime=time.time() + 3600)
  before = live_lock.read_text()
  live = kckpt.Checkpointer(workdir=tmp_path / "live", save_interval_steps=1, lock_stale_secs=0.2)
  with pytest.raises(kckpt.ConcurrentWriterError, match="host 'other-"):
    live.save({"w": np.ones(2)}, step=1)
  assert live_lock.read_text() == before and os.stat(live_lock).st_mtime > time.time()  # the live writer keeps it
  assert not (tmp_path / "live" / "checkpoints" / "ckpt_1").exists()
  # Never refreshed: its writer is gone. Last refreshed 1.8 s ago with a 2 s limit: the new writer
  # waits the last 0.2 s until the lock is stale, then takes it. Its wait gives up stale_secs +
  # refresh_secs (2.33 s) after it began, 2.1 s after the lock went stale: only a stall that long
  # could make it refuse (a fresh lock with a 0.3 s limit left it 0.05 s).
  stale_lock = _fake_remote_lock(tmp_path / "stale" / "checkpoints", mtime=time.time() - 1.8)
  refreshed = os.stat(stale_lock).st_mtime
  stale = kckpt.Checkpointer(workdir=tmp_path / "stale", save_interval_steps=1, lock_stale_secs=2.0)
  assert stale.save({"w": np.ones(2)}, step=1)
  lock = json.loads(stale_lock.read_text())
  assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
  assert lock["since"] - refreshed > 2.0  # taken once stale, not before (a lower bound: load only adds to it)
  stale.close()


def test_a_writer_whose_lock_was_taken_over_stops_saving(workdir):
  first = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=1)
  first.save({"w": np.ones(2)}, step=1)
  first.wait_until_finished()
  second = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=1)  # same process: takes over
  second.save({"w": np.ones(2)}, step=2)
  second.wait_until_finished()
  with pytest.raises(kckpt.ConcurrentWriterError, match="taken over"):
    first.save({"w": np.ones(2)}, step=3)
  assert second.all_steps == [2]
  second.close()


# -- Durability ---------------------------------------------------------------------------------


def test_durable_save_flushes_every_file_before_the_step_is_finished(workdir, monkeypatch):
  synced = []
  real_fsync = os.fsync

  def recording_fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    return real_fsync(fd)

  monkeypatch.setattr(os, "fsync", recording_fsync)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save({"w": jnp.ones(100)}, step=1, metrics={"loss": 1.0})
  ckpt.wait_until_finished()
  final = str(workdir / "checkpoints" / "ckpt_1")
  files = [os.path.relpath(p, final) for p in glob.glob(f"{final}/**", recursive=True) if os.path.isfile(p)]
  before_rename = {os.path.relpath(p, final + ".orbax-checkpoint-tmp") for p in synced if ".orbax-checkpoint-tmp" in p}
  # Item folders are renamed inside the step folder first; compare without their own tmp suffix.
  before_rename = {p.replace(".orbax-checkpoint-tmp", "") for p in before_rename}
  late = {"commit_success.txt", "_CHECKPOINT_METADATA"}  # written by the finalize itself, synced after it
  for name in files:
    if name in late:
      assert os.path.join(final, name) in synced, name
    else:
      assert name in before_rename, f"{name} was not flushed before the step was marked finished"
  assert str(workdir / "checkpoints") in synced  # the rename itself
  monkeypatch.undo()
  plain = []
  monkeypatch.setattr(os, "fsync", lambda fd: plain.append(fd) or real_fsync(fd))
  fast = kckpt.Checkpointer(workdir=workdir.parent / "fast", save_interval_steps=1, durable=False)
  fast.save({"w": jnp.ones(100)}, step=1, metrics={"loss": 1.0})
  fast.close()
  assert plain == []  # durable=False: no extra fsync from kckpt (TensorStore's own are not os.fsync)


# -- Bad input ------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error_and_changes_nothing(tmp_path):
  workdir = tmp_path / "run"
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, best_metric_path="eval.loss")
  ckpt.save({"w": np.ones(2)}, step=1, metrics={"eval": {"loss": 1.0}})
  ckpt.wait_until_finished()
  before = snapshot(workdir / "checkpoints")
  cases = [
    (lambda: ckpt.save({"w": np.ones(2)}, step=-3, metrics={"eval": {"loss": 1.0}}), ValueError, "non-negative int"),
    (lambda: ckpt.save({"w": np.ones(2)}, step=2.0, metrics={"eval": {"loss": 1.0}}), ValueError, "non-negative int"),
    (lambda: ckpt.save({"w": np.ones(2)}, step=2, metrics={"train": {"loss": 1.0}}), ValueError, "has no 'eval'"),
    (lambda: ckpt.save(object(), step=2, metrics={"eval": {"loss": 1.0}}), ValueError, "builtins.object is not an array"),
    (
      lambda: ckpt.save(items.Composite(meta=items.Json({1, 2})), step=2, metrics={"eval": {"loss": 1.0}}),
      ValueError,
      "not JSON-serialisable",
    ),
    (lambda: ckpt.restore({"w": np.ones(2)}, step=9), FileNotFoundError, r"steps: \[1\]"),
    (lambda: ckpt.restore({"v": np.ones(2)}), ValueError, "v: in the target"),
    (lambda: ckpt.delete(-1), ValueError, "non-negative int"),
  ]
  for call, error, message in cases:
    with pytest.raises(error, match=message):
      call()
  assert snapshot(workdir / "checkpoints") == before
  # NaN metrics are saved (training may diverge) but never ranked best.
  assert ckpt.save({"w": np.ones(2)}, step=2, metrics={"eval": {"loss": float("nan")}})
  assert ckpt.best_step == 1
  file_workdir = tmp_path / "a_file"
  file_workdir.write_text("not a folder")
  with pytest.raises(ValueError, match="exists and is not a folder"):
    kckpt.Checkpointer(workdir=file_workdir, save_interval_steps=1).save({"w": np.ones(1)}, step=1)
  assert file_workdir.read_text() == "not a folder"
