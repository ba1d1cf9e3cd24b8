"""How a step becomes visible and how it disappears: durable atomic commit, deletion out of sight."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from kckpt import _fs
from kckpt._orbax import _format
from kckpt._types import Step


def commit_options(directory: epath.Path, durable: bool) -> dict[str, Any]:
  """`CheckpointManagerOptions` fields that say how a step is finished.

  Locally: Orbax's atomic rename (`StepRenameTemporaryPath`), fsyncing
  everything first when `durable` (`DurableRenameTemporaryPath`). On object
  stores (s3://, gs://): Orbax's commit file, written last
  (`StepCommitFileTemporaryPath`; a rename is a copy there). Each runs the
  step's `before_commit` work first. Given as `temporary_path_class`
  (deprecated since Orbax 0.12.3 for `atomicity_options`, which can only pick
  Orbax's own classes).
  """
  if _fs.is_local(directory):
    return {"temporary_path_class": DurableRenameTemporaryPath if durable else StepRenameTemporaryPath}
  return {"temporary_path_class": StepCommitFileTemporaryPath}


# Final step folder -> what to do in its temporary folder just before the commit (primary process only).
_before_commit: dict[str, Callable[[epath.Path], None]] = {}
_before_commit_lock = threading.Lock()


def before_commit(final_step_dir: epath.Path, work: Callable[[epath.Path], None] | None) -> None:
  """Registers `work(temporary folder)` to run in the background just before `final_step_dir` is committed.

  It runs where Orbax finishes the step (the primary process), after every
  process wrote its arrays and before the rename or commit file: what it
  writes into the folder is part of the step, atomically. None unregisters.
  An error it raises fails the save.
  """
  with _before_commit_lock:
    if work is None:
      _before_commit.pop(final_step_dir.as_posix(), None)
    else:
      _before_commit[final_step_dir.as_posix()] = work


async def _run_before_commit(tmp: epath.Path, final: epath.Path) -> None:
  with _before_commit_lock:
    work = _before_commit.pop(epath.Path(final).as_posix(), None)
  if work is not None:
    await asyncio.to_thread(work, epath.Path(tmp))


class StepRenameTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, after the step's `before_commit` work."""

  async def finalize(self, *args, **kwargs):
    await _run_before_commit(self.get(), self.get_final())
    await super().finalize(*args, **kwargs)


class StepCommitFileTemporaryPath(ocp.path.atomicity.CommitFileTemporaryPath):
  """Orbax's commit file (object stores: the step is written in place, the marker last), after `before_commit`."""

  async def finalize(self, *args, **kwargs):
    await _run_before_commit(self.get(), self.get_final())
    await super().finalize(*args, **kwargs)


class RenameThenDelete:
  """Orbax deleter that removes steps with `steps.remove_step_folder`.

  Orbax removes a step folder file by file, so a reader could list the step
  and then find half of it gone; renaming first is atomic on a local or POSIX
  file system, so a reader sees the whole step or no step. On S3 (no rename)
  the commit marker goes first, so listings stop reporting the step before
  any of its data is removed. Only the primary process deletes.

  Orbax decides which steps to delete when a save starts, before the new
  step's health is known; it deletes them once the step is committed.
  `keep(step)` is asked then: a step it says to keep (the newest healthy one,
  when the new step turned out unhealthy) stays, and `on_kept()` lets the
  manager know it is still there.
  """

  def __init__(
    self,
    directory: epath.Path,
    primary_host: int | None,
    keep: Callable[[Step], bool] | None = None,
    on_kept: Callable[[], None] | None = None,
  ):
    self._directory = directory
    self._primary_host = primary_host
    self._keep = keep
    self._on_kept = on_kept

  def delete(self, step: Step) -> None:
    if self._primary_host is not None and jax.process_index() != self._primary_host:
      return
    if not _format.remove_step_folder(self._directory, step):
      logging.getLogger("kckpt").warning("Step %d was already gone from %s", step, self._directory)

  def delete_steps(self, steps: Sequence[Step]) -> None:
    kept = False
    for step in steps:
      if self._keep is not None and self._keep(step):
        logging.getLogger("kckpt").info("Step %d of %s is kept: it is the newest healthy step", step, self._directory)
        kept = True
        continue
      self.delete(step)
    if kept and self._on_kept is not None:
      self._on_kept()

  def close(self) -> None:
    pass


def _fsync_tree(root: str) -> None:
  """fsyncs every file and folder under `root` (and `root` itself)."""
  for folder, _, files in os.walk(root):
    for name in files:
      _fsync_path(os.path.join(folder, name))
    _fsync_path(folder)


def _fsync_path(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_after_rename(final: str) -> None:
  """The files `finalize` wrote last, the step folder and its parent (the rename)."""
  for name in (_format.COMMIT_MARKER, _format.STEP_METADATA_FILE):
    _fsync_path(os.path.join(final, name))
  _fsync_path(final)
  _fsync_path(os.path.dirname(final))


class DurableRenameTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, with everything flushed to stable storage first.

  TensorStore already fsyncs array data, but the JSON files (tree metadata,
  metrics, step metadata) and the folders are written without it, so after a
  power loss a step that was renamed "finished" could hold empty files.
  Before the rename every file and folder of the step is fsynced; after it,
  the step and its parent folder (so that the rename itself is durable).
  """

  async def finalize(self, *args, **kwargs):
    await _run_before_commit(self.get(), self.get_final())
    tmp = str(self.get())
    await asyncio.to_thread(_fsync_tree, tmp)
    await super().finalize(*args, **kwargs)
    final = str(self.get_final())
    await asyncio.to_thread(_fsync_after_rename, final)
