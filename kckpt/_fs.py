"""Local vs object-store paths: the one place that tells them apart.

A local (or POSIX-mounted) path supports atomic rename and cheap ``os`` calls;
an object store (``gs://``, ``s3://``) does not: a "rename" is a copy and each
call is a request. Everything in kckpt that must behave differently asks here.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shutil
from typing import Any, cast

from kckpt import cloud
from kckpt._types import EPath

# Object stores whose "rename" is a copy: finished steps carry a commit file instead.
OBJECT_STORE_SCHEMES = ("gs://", "s3://")


def is_local(path: Any) -> bool:
  """Whether `path` is on a local or mounted file system (not ``scheme://``)."""
  return "://" not in str(path)


class LocalPath(pathlib.PosixPath):
  """A local path with the `epath.Path` methods kckpt uses beyond pathlib's.

  What `as_path` gives for a local folder: `etils.epath` costs 50 ms to import
  (most of the start of ``kckpt ls``), and its `/` and `str` are slower than
  pathlib's, which a listing of thousands of steps calls several times per
  step. Code that needs more of epath's API builds an `epath.Path` itself.

  >>> import tempfile
  >>> folder = as_path(tempfile.mkdtemp()) / "a" / "b"
  >>> folder.mkdir(parents=True)
  >>> folder.parent.rmtree(); folder.parent.exists()
  False
  >>> folder.parent.rmtree(missing_ok=True)
  """

  def rmtree(self, missing_ok: bool = False) -> None:
    """Deletes the folder and everything under it, or the file (as `epath.Path.rmtree`)."""
    try:
      if self.is_dir() and not self.is_symlink():
        shutil.rmtree(self)
      else:
        self.unlink()  # a file, or a link: deleted itself, as epath does
    except FileNotFoundError:
      if not missing_ok:
        raise


def as_path(given: Any) -> EPath:
  """`given` (str or path) as a path object: a `LocalPath` when local, else an `epath.Path`.

  Typed as `epath.Path`: a `LocalPath` has every method of it that kckpt calls.

  >>> type(as_path("/tmp/run")).__name__, str(as_path("/tmp/run") / "checkpoints")
  ('LocalPath', '/tmp/run/checkpoints')
  """
  text = os.fspath(given)
  if is_local(text):
    return cast("EPath", LocalPath(text))
  from etils import epath  # pylint: disable=import-outside-toplevel

  return epath.Path(text)


def is_object_store(path: Any) -> bool:
  """Whether `path` is on an object store without atomic rename (``gs://``, ``s3://``)."""
  return str(path).startswith(OBJECT_STORE_SCHEMES)


def absolute(path: Any) -> Any:
  """`path`, made absolute when it is local (Orbax refuses relative paths)."""
  if is_local(path) and not os.path.isabs(path):
    return os.path.abspath(path)
  return path


def list_names(directory: EPath) -> list[str]:
  """The names in `directory`: one listing (raises FileNotFoundError / NotADirectoryError)."""
  if is_local(directory):
    return os.listdir(directory)  # 10x faster than building a Path per entry
  cloud.prepare(directory)
  return [p.name for p in directory.iterdir()]


def write_text_atomic(path: EPath, text: str, *, tmp_name: str | None = None) -> None:
  """Writes `path` so that a reader sees the old or the new content, never half of it.

  Locally: a temporary file beside it, then `os.replace` (atomic, overwrites).
  On object stores a single object write is already atomic.
  """
  if not is_local(path):
    cloud.prepare(path)
    path.write_text(text)
    return
  tmp = path.parent / (tmp_name or f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def mtime(path: EPath) -> float:
  """Modification time in seconds since the epoch (sub-second locally; whole seconds on S3).

  On object stores it is the store's own time of the last write (S3's
  ``LastModified``): epath's `stat` gives 0 there.
  """
  if is_local(path):
    return os.stat(path).st_mtime
  import fsspec  # pylint: disable=import-outside-toplevel

  cloud.prepare(path)
  fs, key = fsspec.core.url_to_fs(str(path))
  info = fs.info(key)
  for name in ("LastModified", "mtime", "updated"):
    value = info.get(name)
    if isinstance(value, datetime.datetime):
      return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
  raise OSError(f"{path}: the store reports no modification time ({sorted(info)})")


def folder_size(path: EPath) -> int:
  """Bytes under `path` (walks the folder: call only when asked for a size)."""
  if not is_local(path):
    # One recursive listing through fsspec (etils' walk passes s3fs an
    # argument it does not take, and a walk would list folder by folder).
    import fsspec  # pylint: disable=import-outside-toplevel

    cloud.prepare(path)
    fs, root = fsspec.core.url_to_fs(str(path))
    if not fs.exists(root):
      raise FileNotFoundError(f"No such folder: {path}")
    return int(fs.du(root, total=True))
  return _local_folder_size(os.fspath(path))


def _local_folder_size(directory: str) -> int:
  # `os.scandir`, not `epath`'s walk and stat (which also looks up each file's owner and group: 4x slower).
  # As `os.walk` counts: files and links to files; links to folders are not followed; what vanished is skipped.
  total = 0
  try:
    entries = list(os.scandir(directory))
  except OSError:
    return 0  # deleted while walking
  for entry in entries:
    try:
      if entry.is_dir():
        if not entry.is_symlink():
          total += _local_folder_size(entry.path)
      else:
        total += entry.stat().st_size
    except OSError:
      pass  # deleted while walking
  return total
