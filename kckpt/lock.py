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
* on the same host without ``flock`` (some network and FUSE file systems):
  gets `ConcurrentWriterError` while the process the file names is alive,
  started before it took the lock and keeps refreshing it; a lock not
  refreshed for `stale_secs`, or whose process id now belongs to a process
  started later (a reused id), is taken over at once;
* on another host (a shared file system, or an object store): waits until
  the lock has not been refreshed for `stale_secs` (a preempted job restarting
  elsewhere waits at most that long), then takes it over; if the lock keeps
  being refreshed, it gets `ConcurrentWriterError`. The owner refreshes the
  file's time from a background thread; a refresh that fails is raised by the
  owner's next `check` (its next save), never dropped.

On object stores the lock object is created only if absent and replaced
(taken over or refreshed) only if it is still the version read, so two
writers starting at once, or one taking over while the other refreshes, can
never both hold it: on ``s3://`` with ``If-None-Match: *`` / ``If-Match:
<ETag>`` (s3fs), on ``gs://`` with ``ifGenerationMatch=0`` /
``ifGenerationMatch=<generation>`` (google-cloud-storage), where release is
a delete conditional on the generation too.

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
  if pid <= 0:  # not a process id (os.kill would signal a process group)
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _process_start_time(pid: int) -> float | None:
  """When process `pid` started, in seconds since the epoch (Linux ``/proc``; None elsewhere or if gone)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      fields = f.read().rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    with open("/proc/stat", encoding="ascii") as f:
      boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks after boot
  except (OSError, ValueError, IndexError, StopIteration):
    return None


class _S3Lock:
  """The lock object on ``s3://`` (s3fs): versions are ETags."""

  def __init__(self, path: epath.Path):
    self.path = path

  def _fs(self) -> tuple[Any, str]:
    import fsspec  # pylint: disable=import-outside-toplevel  # s3fs, installed with kckpt[s3]

    cloud.prepare(self.path)
    return fsspec.core.url_to_fs(str(self.path))

  def stat(self) -> tuple[str, float] | None:
    """(version, time of the last write by the store's clock), None if absent."""
    fs, key = self._fs()
    try:
      info = fs.info(key)
    except FileNotFoundError:
      return None
    return info["ETag"], info["LastModified"].timestamp()  # S3 keeps whole seconds

  def put(self, data: bytes, *, if_version: str | None) -> str:
    """Creates the object (`if_version` None) or replaces that version; `_Changed` if it is not."""
    fs, key = self._fs()
    try:
      if if_version is None:
        fs.pipe_file(key, data, mode="create")
      else:
        fs.pipe_file(key, data, IfMatch=if_version)
    except FileExistsError:
      raise _Changed() from None
    except OSError as e:
      if e.errno == errno.EINVAL:  # s3fs's PreconditionFailed (stores that do not name the condition)
        raise _Changed() from e
      raise
    return fs.info(key)["ETag"]

  def read(self) -> bytes | None:
    for attempt in range(5):
      try:
        return self.path.read_bytes()
      except (FileNotFoundError, NotADirectoryError):
        return None
      except OSError:
        # The lock can be replaced between the read's metadata request and its
        # data request (s3fs: "FileExpired") when the holder refreshes it: read again.
        if attempt == 4:
          raise
        time.sleep(0.05)
    return None

  def delete(self, *, if_version: str) -> None:
    del if_version  # s3fs deletes unconditionally: `release` checks the token first
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass


class _GcsLock:
  """The lock object on ``gs://`` (google-cloud-storage): versions are generations."""

  def __init__(self, path: epath.Path):
    from google.cloud import storage  # type: ignore[import-untyped]  # pylint: disable=import-outside-toplevel  # kckpt[gcs]

    self.path = path
    bucket, _, self._key = str(path)[len(cloud.GCS_SCHEME) :].partition("/")
    self._bucket = storage.Client().bucket(bucket)  # Google's default credentials; STORAGE_EMULATOR_HOST

  def stat(self) -> tuple[str, float] | None:
    blob = self._bucket.get_blob(self._key)
    if blob is None:
      return None
    return str(blob.generation), blob.updated.timestamp()

  def put(self, data: bytes, *, if_version: str | None) -> str:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    blob = self._bucket.blob(self._key)
    try:
      blob.upload_from_string(data, content_type="application/json", if_generation_match=int(if_version or 0))
    except exceptions.PreconditionFailed:
      raise _Changed() from None
    return str(blob.generation)

  def read(self) -> bytes | None:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    try:
      return self._bucket.blob(self._key).download_as_bytes()
    except exceptions.NotFound:
      return None

  def delete(self, *, if_version: str) -> None:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel

    try:
      self._bucket.blob(self._key).delete(if_generation_match=int(if_version))
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass  # gone, or another writer's by now: not this writer's to delete


class _Changed(Exception):
  """A conditional write found the lock object created or replaced by someone else."""


class WriterLock:
  """The lock of one writer; `acquire` it, `check` it at each save, `release` it at close.

  `use_flock` False makes a local lock rely on the file's content alone, as on
  a file system without ``flock`` (for tests of that case).
  """

  def __init__(
    self,
    checkpoints: epath.Path,
    *,
    stale_secs: float = 60.0,
    refresh_secs: float | None = None,
    use_flock: bool = True,
  ):
    self.path = checkpoints / LOCK_FILE
    self.stale_secs = stale_secs
    self.refresh_secs = refresh_secs if refresh_secs is not None else max(stale_secs / 6, 0.05)
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    self._local = _fs.is_local(self.path)
    self._use_flock = use_flock
    self._fd: int | None = None  # holds the kernel lock (local paths)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._refresh_error: BaseException | None = None
    self._store: _S3Lock | _GcsLock | None = None  # object stores with conditional writes
    self._version: str | None = None  # there: the version of the lock object this writer wrote last

  # -- Reading the lock file ----------------------------------------------------

  def _conditional_store(self) -> _S3Lock | _GcsLock | None:
    if self._store is None:
      if cloud.is_s3(self.path):
        self._store = _S3Lock(self.path)
      elif cloud.is_gcs(self.path):
        self._store = _GcsLock(self.path)
    return self._store

  def _read(self) -> dict | None:
    store = None if self._local else self._conditional_store()
    try:
      if store is not None:
        data = store.read()
        return None if data is None else json.loads(data)
      return json.loads(self.path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
      return None

  def _age(self) -> float:
    store = None if self._local else self._conditional_store()
    try:
      if store is not None:
        stat = store.stat()
        return float("inf") if stat is None else time.time() - stat[1]
      return time.time() - _fs.mtime(self.path)
    except FileNotFoundError:
      return float("inf")

  def _content(self) -> bytes:
    return json.dumps({**self.owner, "since": time.time()}).encode()

  def _write(self) -> None:
    _fs.write_text_atomic(self.path, self._content().decode(), tmp_name=f".{LOCK_FILE}.{self.owner['token']}")

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
    elif self._conditional_store() is not None:
      self._acquire_conditional()
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
        locked = _kernel_lock(fd) if self._use_flock else None
        if locked is not False and not _same_file(fd, self.path):
          # Locked a file that its writer unlinked at release while this one opened it: try the new one.
          os.close(fd)
          continue
        holder = self._read()
        same_host = holder is not None and holder.get("host") == self.owner["host"]
        if locked is False or (locked is None and same_host and self._holder_runs_here(holder)):  # type: ignore[arg-type]
          raise self._refused(holder or {"pid": "?", "host": self.owner["host"]})
        if holder is not None and not same_host and self._age() <= self.stale_secs:
          self._wait_until_stale(holder)  # a writer on another host of a shared file system without flock
        return fd
      except BaseException:
        os.close(fd)
        raise
    raise ConcurrentWriterError(f"{self.path} keeps being replaced by other writers")

  def _holder_runs_here(self, holder: dict) -> bool:
    """Without flock: whether the writer that the lock file names (on this host) still runs.

    A process id is reused (a container restart gives the same low ids again),
    so a live process under that id is not enough: the lock must also have been
    refreshed within `stale_secs`, and the process must not have started after
    the lock was taken.
    """
    try:
      pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
      return False
    if not _pid_alive(pid) or self._age() > self.stale_secs:
      return False
    # A process that started after the lock was taken got a reused id (1 s: /proc's boot time is whole seconds).
    started, since = _process_start_time(pid), holder.get("since")
    return started is None or not isinstance(since, (int, float)) or started <= since + 1.0

  def _write_in_place(self) -> None:
    assert self._fd is not None
    data = self._content()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)  # no fsync: after a crash the kernel lock, not the content, decides

  def _wait_until_stale(self, holder: dict) -> None:
    deadline = time.monotonic() + self.stale_secs + self.refresh_secs
    while self._age() <= self.stale_secs:
      if time.monotonic() > deadline:
        raise self._refused(holder)
      time.sleep(min(self.refresh_secs, 1.0))

  # -- Object stores: conditional writes ------------------------------------------
  #
  # The lock object is created only if absent (s3: If-None-Match: *, gs:
  # ifGenerationMatch=0: only one creator wins) and replaced, when taken over or
  # refreshed, only if it is still the version read (If-Match: <ETag>,
  # ifGenerationMatch=<generation>), so two writers can never both believe they hold it.

  def _put(self, *, if_match: str | None) -> None:
    """Creates the lock (`if_match` None) or replaces the version `if_match`; ConcurrentWriterError if it changed."""
    store = self._conditional_store()
    assert store is not None
    try:
      self._version = store.put(self._content(), if_version=if_match)
    except _Changed:
      # A retried request whose first attempt had succeeded finds its own write: still this writer's.
      stat, holder = store.stat(), self._read() or {}
      if stat is not None and holder.get("token") == self.owner["token"]:
        self._version = stat[0]
        return
      if if_match is None:
        raise ConcurrentWriterError(f"{self.path.parent} was taken by another writer as this one started") from None
      raise ConcurrentWriterError(f"{self.path} was created or replaced by another writer") from None

  # The names tests/integration/test_s3.py uses.
  _put_s3 = _put

  @property
  def _etag(self) -> str | None:
    return self._version

  def _acquire_conditional(self) -> None:
    store = self._conditional_store()
    assert store is not None
    deadline = time.monotonic() + self.stale_secs + self.refresh_secs
    while True:
      stat = store.stat()
      if stat is None:
        self._put(if_match=None)
        return
      version, written = stat
      holder = self._read() or {}
      if holder.get("host") == self.owner["host"] and holder.get("pid") == self.owner["pid"]:
        log.warning("%s was opened for writing by another Checkpointer of this process; this one takes over.", self.path.parent)
        self._put(if_match=version)
        return
      if time.time() - written > self.stale_secs:  # not refreshed for too long: its writer is gone
        self._put(if_match=version)
        return
      if time.monotonic() > deadline:
        raise self._refused(holder)
      time.sleep(min(self.refresh_secs, 1.0))

  def _acquire_remote(self) -> None:
    """Other remote file systems: write, then read back (not atomic: two writers starting at once may both win)."""
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
        elif self._version is not None:
          self._put(if_match=self._version)
        else:
          self._write()
        last_ok = time.monotonic()
      except ConcurrentWriterError as e:  # another writer replaced the lock: final
        self._refresh_error = e
        return
      except Exception as e:  # pylint: disable=broad-exception-caught  # google-api-core's errors are not OSErrors
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
      store = None if self._local else self._conditional_store()
      if store is not None and self._version is not None:
        store.delete(if_version=self._version)  # on gs://, only the version this writer wrote
      else:
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
