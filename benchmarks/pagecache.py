"""Page-cache control for timed saves and restores (imports nothing heavy).

- `flush_all` before a timed save: no system pays for the write-back of the
  files an earlier one left dirty.
- `make_durable` at the end of a timed save of a system that does not fsync
  all of a step (Orbax, Kauldron: TensorStore fsyncs their array data, not
  their JSON metadata nor their folders): every saver is timed until its
  files are on disk, as kckpt's saves (``durable=True``) and the plain files
  are.
- `evict` before a timed restore: the restore reads the disk.
"""

from __future__ import annotations

import os
from pathlib import Path


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
