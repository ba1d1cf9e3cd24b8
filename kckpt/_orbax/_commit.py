"""How a step becomes visible and how it disappears: durable atomic commit, deletion out of sight."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from kckpt import _fs
from kckpt import cloud
from kckpt._orbax import _format
from kckpt._types import Step


def commit_options(directory: epath.Path, durable: bool) -> dict[str, Any]:
  """`CheckpointManagerOptions` fields that say how a step is finished.

  Locally: Orbax's atomic rename, with `DurableRenameTemporaryPath` when
  `durable` (given as `temporary_path_class`, deprecated since Orbax 0.12.3
  for `atomicity_options`, which can only pick Orbax's own classes). On S3:
  Orbax's commit file (a rename is a copy there). Elsewhere (gs://): Orbax's
  choice.
  """
  if _fs.is_local(directory):
    return {"temporary_path_class": DurableRenameTemporaryPath} if durable else {}
  if cloud.is_s3(directory):
    return {"atomicity_options": ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)}
  return {}


class RenameThenDelete:
  """Orbax deleter that removes steps with `steps.remove_step_folder`.

  Orbax removes a step folder file by file, so a reader could list the step
  and then find half of it gone; renaming first is atomic on a local or POSIX
  file system, so a reader sees the whole step or no step. On S3 (no rename)
  the commit marker goes first, so listings stop reporting the step before
  any of its data is removed. Only the primary process deletes.
  """

  def __init__(self, directory: epath.Path, primary_host: int | None):
    self._directory = directory
    self._primary_host = primary_host

  def delete(self, step: Step) -> None:
    if self._primary_host is not None and jax.process_index() != self._primary_host:
      return
    if not _format.remove_step_folder(self._directory, step):
      logging.getLogger("kckpt").warning("Step %d was already gone from %s", step, self._directory)

  def delete_steps(self, steps: Sequence[Step]) -> None:
    for step in steps:
      self.delete(step)

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
    tmp = str(self.get())
    await asyncio.to_thread(_fsync_tree, tmp)
    await super().finalize(*args, **kwargs)
    final = str(self.get_final())
    await asyncio.to_thread(_fsync_after_rename, final)
