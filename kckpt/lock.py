"""One writer per run: a lock that a second trainer on the same workdir trips over.

Two trainers pointed at one workdir by mistake would delete each other's steps
through retention and race on the same step folders. The first `Checkpointer`
that writes takes ``checkpoints/WRITER_LOCK.json`` (host, process id, a random
token). Locally the file is also locked by the kernel (``flock``) for as long
as the writer's process lives, so a writer that died (SIGKILL, OOM, a reused
process id after a container restart) never blocks the next one. A second
writer:

* on the same host, while the owner holds the kernel lock: gets
  `ConcurrentWriterError` at once (another `Checkpointer` of the same process
  takes over instead, with a warning: the older one's next save raises);
* on the same host, when no process holds the kernel lock: takes over at once,
  whatever process id the file names (its writer is gone);
* on another host (a shared file system, or an object store): waits until the
  lock has not been refreshed for `stale_secs` (a preempted job restarting
  elsewhere waits at most that long), then takes it over; if the lock keeps
  being refreshed, it gets `ConcurrentWriterError`. The owner refreshes the
  file's time from a background thread; a refresh that fails is raised by the
  owner's next `check` (its next save), never dropped.

On ``s3://`` the lock object is created with a conditional write
(``If-None-Match: *``) and replaced only with ``If-Match`` on the version read,
so two writers starting at once, or one taking over while the other
refreshes, can never both hold it.

A writer also checks at each save that the lock is still its own, so a writer
whose lock was taken over stops instead of deleting the new owner's steps.
In a multi-process run only the primary process takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from kckpt import _fs
from kckpt import cloud
from kckpt.errors import ConcurrentWriterError

LOCK_FILE = "WRITER_LOCK.json"

log = logging.getLogger("kckpt")

# Locks held by this process, by path: another Checkpointer of this process takes them over.
_held: dict[str, WriterLock] = {}
_held_lock = threading.Lock()


def _kernel_lock(fd: int) -> bool | None:
  """Takes the kernel's exclusive lock on `fd` without waiting.

  True: taken; False: another process holds it; None: this file system has no
  ``flock`` (the file's content decides alone).
  """
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
      return False
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
      return None
    raise
  return True


def _same_file(fd: int, path: epath.Path) -> bool:
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except FileNotFoundError:
    return False


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
    self._local = _fs.is_local(self.path)
    self._fd: int | None = None  # holds the kernel lock (local paths)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._refresh_error: BaseException | None = None
    self._etag: str | None = None  # s3://: the version of the lock object this writer wrote last

  # -- Reading the lock file ----------------------------------------------------

  def _read(self) -> dict | None:
    attempts = 1 if self._local else 5
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

  def _refused(self, holder: dict) -> ConcurrentWriterError:
    return ConcurrentWriterError(
      f"{self.path.parent} is being written by {self._describe(holder)} (lock {self.path}, refreshed"
      f" {self._age():.0f} s ago). Two trainers must not share a workdir; if that writer is really"
      f" gone, delete the lock file."
    )

  # -- Taking and giving back ---------------------------------------------------

  def acquire(self) -> None:
    """Takes the lock, or raises `ConcurrentWriterError` naming the live holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._local:
      self._acquire_local()
    else:
      self._acquire_remote()
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh_loop, name="kckpt-writer-lock", daemon=True)
    self._thread.start()

  def _acquire_local(self) -> None:
    key = os.path.realpath(self.path)
    with _held_lock:
      previous = _held.get(key)
      if previous is not None and previous._fd is not None:
        # Another Checkpointer of this process (a notebook cell run again): the
        # newer one wins, and the older one's next save raises.
        log.warning("%s was opened for writing by another Checkpointer of this process; this one takes over.", self.path.parent)
        self._fd, previous._fd = previous._fd, None
        previous._stop.set()
        _held[key] = self
        self._write_in_place()
        return
    fd = self._lock_file()  # waits (for a writer on another host) outside the registry's lock
    with _held_lock:
      self._fd = fd
      _held[key] = self
    self._write_in_place()

  def _lock_file(self) -> int:
    """Opens the lock file and takes its kernel lock; returns the descriptor (ConcurrentWriterError if held)."""
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        locked = _kernel_lock(fd)
        if locked is not False and not _same_file(fd, self.path):
          # Locked a file that its writer unlinked at release while this one opened it: try the new one.
          os.close(fd)
          continue
        holder = self._read()
        same_host = holder is not None and holder.get("host") == self.owner["host"]
        if locked is False or (locked is None and same_host and _pid_alive(int(holder.get("pid", -1)))):  # type: ignore[union-attr]
          raise self._refused(holder or {"pid": "?", "host": self.owner["host"]})
        if holder is not None and not same_host and self._age() <= self.stale_secs:
          self._wait_until_stale(holder)  # a writer on another host of a shared file system without flock
        return fd
      except BaseException:
        os.close(fd)
        raise
    raise ConcurrentWriterError(f"{self.path} keeps being replaced by other writers")

  def _write_in_place(self) -> None:
    assert self._fd is not None
    data = json.dumps({**self.owner, "since": time.time()}).encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)  # no fsync: after a crash the kernel lock, not the content, decides

  def _wait_until_stale(self, holder: dict) -> None:
    deadline = time.monotonic() + self.stale_secs + self.refresh_secs
    while self._age() <= self.stale_secs:
      if time.monotonic() > deadline:
        raise self._refused(holder)
      time.sleep(min(self.refresh_secs, 1.0))

  # -- s3://: conditional writes ---------------------------------------------------
  #
  # The lock object is created with If-None-Match: * (only one creator wins) and
  # replaced, when taken over or refreshed, with If-Match: <the ETag read>, so two
  # writers can never both believe they hold it.

  def _s3(self) -> tuple[Any, str]:
    import fsspec  # pylint: disable=import-outside-toplevel  # s3fs, installed with kckpt[s3]

    cloud.prepare(self.path)
    return fsspec.core.url_to_fs(str(self.path))

  def _content(self) -> bytes:
    return json.dumps({**self.owner, "since": time.time()}).encode()

  def _put_s3(self, *, if_match: str | None) -> None:
    """Creates the lock (`if_match` None) or replaces the version `if_match`; ConcurrentWriterError if it changed."""
    fs, key = self._s3()
    try:
      if if_match is None:
        fs.pipe_file(key, self._content(), mode="create")
      else:
        fs.pipe_file(key, self._content(), IfMatch=if_match)
    except FileExistsError:
      raise ConcurrentWriterError(f"{self.path.parent} was taken by another writer as this one started") from None
    except OSError as e:
      if e.errno == errno.EINVAL:  # s3fs's PreconditionFailed (stores that do not name the condition)
        raise ConcurrentWriterError(f"{self.path} was created or replaced by another writer") from e
      raise
    self._etag = fs.info(key)["ETag"]

  def _etag_of_holder(self) -> str | None:
    fs, key = self._s3()
    try:
      return fs.info(key)["ETag"]
    except FileNotFoundError:
      return None

  def _acquire_s3(self) -> None:
    deadline = time.monotonic() + self.stale_secs + self.refresh_secs
    while True:
      etag = self._etag_of_holder()
      if etag is None:
        self._put_s3(if_match=None)
        return
      holder = self._read() or {}
      if holder.get("host") == self.owner["host"] and holder.get("pid") == self.owner["pid"]:
        log.warning("%s was opened for writing by another Checkpointer of this process; this one takes over.", self.path.parent)
        self._put_s3(if_match=etag)
        return
      if self._age() > self.stale_secs:  # not refreshed for too long: its writer is gone
        self._put_s3(if_match=etag)
        return
      if time.monotonic() > deadline:
        raise self._refused(holder)
      time.sleep(min(self.refresh_secs, 1.0))

  def _acquire_remote(self) -> None:
    if cloud.is_s3(self.path):
      self._acquire_s3()
      return
    holder = self._read()
    if holder is not None and holder.get("token") != self.owner["token"]:
      if holder.get("host") == self.owner["host"] and holder.get("pid") == self.owner["pid"]:
        log.warning("%s was opened for writing by another Checkpointer of this process; this one takes over.", self.path.parent)
      else:
        self._wait_until_stale(holder)
    self._write()
    time.sleep(0.01)
    if (self._read() or {}).get("token") != self.owner["token"]:  # another writer won a simultaneous start
      raise ConcurrentWriterError(f"{self.path.parent} was taken by another writer as this one started")

  def _refresh_loop(self) -> None:
    last_ok = time.monotonic()
    while not self._stop.wait(self.refresh_secs):
      try:
        if self._local:
          os.utime(self.path)
        elif self._etag is not None:
          self._put_s3(if_match=self._etag)
        else:
          self._write()
        last_ok = time.monotonic()
      except ConcurrentWriterError as e:  # another writer replaced the lock: final
        self._refresh_error = e
        return
      except OSError as e:
        # A transient error is retried while the lock is still far from stale; after
        # that another writer may take over, so the next `check` raises it.
        if time.monotonic() - last_ok > self.stale_secs / 2:
          self._refresh_error = e
          return

  def check(self) -> None:
    """Raises `ConcurrentWriterError` when another writer took the lock over, or it could not be kept."""
    if self._refresh_error is not None:
      raise ConcurrentWriterError(
        f"This writer could not refresh its lock {self.path} ({type(self._refresh_error).__name__}:"
        f" {self._refresh_error}); it stops saving, as another writer may take the run over."
      ) from self._refresh_error
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
    if self._fd is not None:
      with _held_lock:
        if _held.get(os.path.realpath(self.path)) is self:
          del _held[os.path.realpath(self.path)]
      os.close(self._fd)  # releases the kernel lock
      self._fd = None
