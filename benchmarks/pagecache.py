"""Dropping a checkpoint's files from the page cache, so that a timed restore reads the disk (imports nothing heavy)."""

from __future__ import annotations

import os
from pathlib import Path


def evict(path: Path) -> None:
  """Makes every file under `path` durable and drops it from the page cache."""
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)
