"""The writer lock: a dead writer never blocks the next one; a live one always does; a lost lock is reported."""

import json
import os
import socket
import time

import pytest
from etils import epath

import kckpt
from kckpt import lock as lock_lib


def _stale_lock_of_a_dead_writer(checkpoints, pid):
  checkpoints.mkdir(parents=True)
  path = checkpoints / lock_lib.LOCK_FILE
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "token": "dead"}))
  day_ago = time.time() - 86400
  os.utime(path, (day_ago, day_ago))
  return path


def test_a_lock_whose_process_id_was_reused_does_not_block(tmp_path):
  # pid 1 is alive (it is this container's init), but it never held the kernel lock.
  _stale_lock_of_a_dead_writer(tmp_path / "checkpoints", pid=1)
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    assert ckpt.save({"w": [1.0]}, step=1)
    holder = json.loads((tmp_path / "checkpoints" / lock_lib.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()


def test_the_kernel_lock_refuses_a_second_holder_at_once(tmp_path):
  checkpoints = epath.Path(tmp_path)
  first = lock_lib.WriterLock(checkpoints, stale_secs=60)
  first.acquire()
  try:
    # Another open file description of the lock file: what another process would have.
    fd = os.open(checkpoints / lock_lib.LOCK_FILE, os.O_RDWR)
    try:
      assert lock_lib._kernel_lock(fd) is False  # pylint: disable=protected-access
    finally:
      os.close(fd)
  finally:
    first.release()
  assert not (checkpoints / lock_lib.LOCK_FILE).exists()


def test_a_refresh_that_fails_is_raised_by_the_next_check(tmp_path):
  checkpoints = epath.Path(tmp_path)
  lock = lock_lib.WriterLock(checkpoints, stale_secs=0.3)  # refreshed every 0.05 s
  lock.acquire()
  try:
    (checkpoints / lock_lib.LOCK_FILE).unlink()  # the next refresh (os.utime) fails
    deadline = time.monotonic() + 30
    while True:
      with pytest.raises(kckpt.ConcurrentWriterError) as e:
        lock.check()
      if "could not refresh" in str(e.value) or time.monotonic() > deadline:
        break
    assert "could not refresh its lock" in str(e.value) and "FileNotFoundError" in str(e.value)
  finally:
    lock.release()


# -- A local file system without flock: the file's content decides alone -------------------------


def _lock_file_naming(checkpoints, pid, *, since, refreshed):
  checkpoints.mkdir(parents=True, exist_ok=True)
  path = checkpoints / lock_lib.LOCK_FILE
  holder = {"host": socket.gethostname(), "pid": pid, "token": "other"}
  if since is not None:  # lock files of older kckpt versions have no "since"
    holder["since"] = since
  path.write_text(json.dumps(holder))
  os.utime(path, (refreshed, refreshed))
  return path


def _other_process():
  """A live process of this host that is not a kckpt writer."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_without_flock_a_day_old_lock_of_a_live_reused_pid_is_taken_over(tmp_path):
  # pid 1 is alive (this container's init): the process-id rule alone would refuse forever. No
  # "since" in the file, so only the day without a refresh tells that its writer is gone.
  day_ago = time.time() - 86400
  path = _lock_file_naming(epath.Path(tmp_path), 1, since=None, refreshed=day_ago)
  lock = lock_lib.WriterLock(epath.Path(tmp_path), stale_secs=60, use_flock=False)
  lock.acquire()
  try:
    assert json.loads(path.read_text())["token"] == lock.owner["token"]
    lock.check()
  finally:
    lock.release()
  assert not path.exists()


def test_without_flock_a_fresh_lock_of_a_live_writer_refuses(tmp_path):
  proc = _other_process()
  try:
    now = time.time()  # the process started before it took the lock, which it refreshed just now
    _lock_file_naming(epath.Path(tmp_path), proc.pid, since=now, refreshed=now)
    lock = lock_lib.WriterLock(epath.Path(tmp_path), stale_secs=60, use_flock=False)
    with pytest.raises(kckpt.ConcurrentWriterError, match=f"process {proc.pid} on host"):
      lock.acquire()
  finally:
    proc.kill()
    proc.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times are read from /proc")
def test_without_flock_a_fresh_lock_whose_pid_now_names_a_newer_process_is_taken_over(tmp_path):
  # The lock was taken a minute ago by a process that is gone; its id now belongs to one started since.
  proc = _other_process()
  try:
    path = _lock_file_naming(epath.Path(tmp_path), proc.pid, since=time.time() - 60, refreshed=time.time())
    lock = lock_lib.WriterLock(epath.Path(tmp_path), stale_secs=60, use_flock=False)
    lock.acquire()
    try:
      assert json.loads(path.read_text())["token"] == lock.owner["token"]
    finally:
      lock.release()
  finally:
    proc.kill()
    proc.wait()
