"""One writer per run: a lock file that a second trainer on the same workdir trips over.

Two trainers pointed at one workdir by mistake would delete each other's steps
through retention and race on the same step folders. The first `Checkpointer`
that writes takes ``checkpoints/WRITER_LOCK.json`` (host, process id, a random
token) and refreshes its time every few seconds from a background thread.
A second writer:

* on the same host, while the owner process is alive: gets
  `ConcurrentWriterError` at once (another `Checkpointer` of the same
  process takes over instead, with a warning: the older one's next save
  raises);
* on another host: waits until the lock has not been refreshed for
  `stale_secs` (a preempted job restarting elsewhere waits at most that long),
  then takes it over; if the lock keeps being refreshed, it gets
  `ConcurrentWriterError`.

A writer also checks at each save that the lock is still its own, so a writer
whose lock was taken over stops instead of deleting the new owner's steps.
In a multi-process run only the primary process takes the lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

from kckpt import _fs
from kckpt.errors import ConcurrentWriterError

LOCK_FILE = "WRITER_LOCK.json"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WriterLock:
  """The lock of one writer; `acquire` it, `check` it at each save, `release` it at close."""

  def __init__(self, checkpoints: epath.Path, *, stale_secs: float = 60.0, refresh_secs: float | None = None):
    self.path = checkpoints / LOCK_FILE
    self.stale_secs = stale_secs
    self.refresh_secs = refresh_secs if refresh_secs is not None else max(stale_secs / 6, 0.05)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict | None:
    attempts = 1 if _fs.is_local(self.path) else 5
    for attempt in range(attempts):
      try:
        return json.loads(self.path.read_text())
      except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None
      except OSError:
        # On an object store the lock can be replaced between the read's
        # metadata request and its data request (s3fs: "FileExpired"), when
        # the holder refreshes it at that moment: read it again.
        if attempt == attempts - 1:
          raise
        time.sleep(0.05)
    return None

  def _age(self) -> float:
    try:
      return time.time() - _fs.mtime(self.path)
    except FileNotFoundError:
      return float("inf")

  def _write(self) -> None:
    _fs.write_text_atomic(
      self.path, json.dumps({**self.owner, "since": time.time()}), tmp_name=f".{LOCK_FILE}.{self.owner['token']}"
    )

  def _describe(self, holder: dict) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')!r}"

  def acquire(self) -> None:
    """Takes the lock, or raises `ConcurrentWriterError` naming the live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + self.stale_secs + self.refresh_secs
    while True:
      holder = self._read()
      if holder is None or holder.get("token") == self.owner["token"]:
        break
      same_host = holder.get("host") == self.owner["host"]
      if same_host and not _pid_alive(int(holder.get("pid", -1))):
        break  # its process is gone: a crashed or preempted earlier run
      if same_host and int(holder.get("pid", -1)) == self.owner["pid"]:
        # Another Checkpointer of this process (a notebook cell run again): the
        # newer one wins, and the older one's next save raises.
        logging.getLogger("kckpt").warning(
          "%s was opened for writing by another Checkpointer of this process; this one takes over.", self.path.parent
        )
        break
      if not same_host and self._age() > self.stale_secs:
        break  # not refreshed for too long: its writer is gone
      if same_host or time.monotonic() > deadline:
        raise ConcurrentWriterError(
          f"{self.path.parent} is being written by {self._describe(holder)} (lock {self.path}, refreshed"
          f" {self._age():.0f} s ago). Two trainers must not share a workdir; if that writer is really"
          f" gone, delete the lock file."
        )
      time.sleep(min(self.refresh_secs, 1.0))
    self._write()
    time.sleep(0.01)
    if (self._read() or {}).get("token") != self.owner["token"]:  # another writer won a simultaneous start
      raise ConcurrentWriterError(f"{self.path.parent} was taken by another writer as this one started")
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name="kckpt-writer-lock", daemon=True)
    self._thread.start()

  def _refresh_loop(self) -> None:
    while not self._stop.wait(self.refresh_secs):
      try:
        if not _fs.is_local(self.path):
          self._write()
        else:
          os.utime(self.path)
      except OSError:
        pass  # the next `check` reports a lost lock

  def check(self) -> None:
    """Raises `ConcurrentWriterError` when another writer took the lock over."""
    holder = self._read()
    if holder is None or holder.get("token") != self.owner["token"]:
      raise ConcurrentWriterError(
        f"This writer's lock on {self.path.parent} was taken over"
        + (f" by {self._describe(holder)}" if holder else " (the lock file was removed)")
        + "; it stops saving so that it cannot delete the other writer's steps."
      )

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    holder = self._read()
    if holder is not None and holder.get("token") == self.owner["token"]:
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
