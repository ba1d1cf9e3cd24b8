"""Page-cache and memory control for timed saves and restores (imports nothing heavy).

- `flush_all` before a timed save: no system pays for the write-back of the
  files an earlier one left dirty.
- `make_durable` at the end of a timed save of a system that does not fsync
  all of a step (Orbax, Kauldron: TensorStore fsyncs their array data, not
  their JSON metadata nor their folders): every saver is timed until its
  files are on disk, as kckpt's saves (``durable=True``) and the plain files
  are.
- `evict` before a timed restore: the restore reads the disk.
- `settle` right before every timed save or restore: each starts with the
  machine's free memory in the same state (see its doc).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SETTLE_SECS = 3.0


def flush_all() -> None:
  """Writes every dirty page of the machine to disk (``sync``)."""
  os.sync()


def fsync(path: str, *, drop: bool = False) -> None:
  """Fsyncs one file or folder; with `drop`, then drops it from the page cache."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    if drop:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def make_durable(path: Path) -> None:
  """Fsyncs every file and folder under `path`, `path` itself and its parent (which holds its name).

  Raises FileNotFoundError when `path` is not a folder: a step that is not
  where the caller expects it would otherwise be timed without its fsync.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no folder to make durable at {path}")
  for root, _, files in os.walk(path):
    for name in files:
      fsync(os.path.join(root, name))
    fsync(root)
  fsync(os.path.dirname(os.path.abspath(path)))


def evict(path: Path) -> None:
  """Makes every file under `path` durable and drops it from the page cache."""
  for root, _, files in os.walk(path):
    for name in files:
      fsync(os.path.join(root, name), drop=True)


def settle(seconds: float = SETTLE_SECS) -> None:
  """Waits `seconds` (3 s) before a timed call, so that no system writes into memory the one before just freed.

  On a virtual machine whose balloon device reports free pages to the host
  (this project's benchmark machine: ``virtio_balloon`` with the
  ``REPORTING`` feature), memory freed by the guest goes back to the host
  within a fraction of a second, and the next use of each page then costs
  the host a fault. A save is mostly the kernel copying its bytes into the
  page cache, so a save that started right after the previous one deleted
  its step (or after a restore freed its arrays) wrote into pages still
  held, and one that started later, or wrote more slowly, into pages given
  back: measured here, tuned Orbax's sync save of the GPT-2 state took
  1.2-1.4 s right after a delete and 1.6-2.9 s after 0.3-2 s of pause, and
  the kernel's share of a save varied 4x for the same bytes. After a
  pause, every system starts from the same state: as a training job does,
  whose saves come minutes apart.
  """
  time.sleep(seconds)
