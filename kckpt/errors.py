"""Exceptions raised by kckpt.

Each one subclasses the built-in exception a caller would already catch
(`FileNotFoundError`, `ValueError`, `RuntimeError`, `PermissionError`), so
code written against Kauldron or Orbax keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence


class CheckpointNotFoundError(FileNotFoundError):
  """A step (or any step at all) is missing from a run."""

  def __init__(self, message: str, *, available_steps: Sequence[int] = ()):
    super().__init__(message)
    self.available_steps = tuple(available_steps)


class StepAlreadyExistsError(ValueError):
  """`save` was asked to write a step that is already on disk or in flight."""


class TreeMismatchError(ValueError):
  """The restore target does not have the structure of the saved tree.

  `problems` holds one line per leaf at fault, each naming its pytree path.
  """

  def __init__(self, message: str, *, problems: Sequence[str] = ()):
    super().__init__(message)
    self.problems = tuple(problems)


class BackgroundSaveError(RuntimeError):
  """An asynchronous save failed after `save` returned.

  Raised at the next `save`, `maybe_save`, `wait_until_finished` or `close`.
  `step` is the step that was being written; the original error is the
  `__cause__`.
  """

  def __init__(self, message: str, *, step: int | None):
    super().__init__(message)
    self.step = step


class ReadOnlyCheckpointerError(PermissionError):
  """A write (save, delete) was asked of a `Checkpointer(create=False)`."""


class CheckpointReadError(OSError):
  """A step could not be read: a missing, truncated or corrupted file.

  The message names the step, the item and the file or error at fault.
  Other steps are not affected (`latest_step` and listing keep working).
  """

  def __init__(self, message: str, *, step: int | None = None, item: str | None = None):
    super().__init__(message)
    self.step = step
    self.item = item


class ConcurrentWriterError(RuntimeError):
  """Another live process is already writing checkpoints to this workdir."""


class ProcessTimeoutError(TimeoutError):
  """In a multi-process run, another process did not come to a point every process must reach.

  A process died or is stuck. Raised after `Checkpointer.barrier_timeout_secs`
  instead of waiting forever; `processes` holds the missing ones when the
  coordination service names them.
  """

  def __init__(self, message: str, *, processes: Sequence[int] = ()):
    super().__init__(message)
    self.processes = tuple(processes)


class LeafReadError(Exception):
  """Some leaves of an item could not be read; `leaves` names them (dotted pytree paths).

  Raised by kckpt's reader; `restore` turns it into a `CheckpointReadError`
  that also names the step and item.
  """

  def __init__(self, leaves: Sequence[str], cause: BaseException):
    super().__init__(f"unreadable leaves {list(leaves)}: {describe_read_error(cause, limit=300)}")
    self.leaves = tuple(leaves)


def describe_read_error(error: BaseException, limit: int = 240) -> str:
  """One line for an error reading a checkpoint: the first error of its chain, cut before TensorStore's spec dump.

  A CRC32C mismatch found by TensorStore ("Digest mismatch", in steps of earlier
  development versions) is said in words, as kckpt's own mismatches are.

  >>> describe_read_error(ValueError("DATA_LOSS: Digest mismatch, stored digest is 0x1"))
  'checksum mismatch, the data changed after it was saved: ValueError: DATA_LOSS: Digest mismatch, stored digest is 0x1'
  """
  error = _innermost(error)
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore")[0].split(" [tensorstore_spec=")[0].split(" [source locations=")[0]
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  what = "checksum mismatch, the data changed after it was saved: " if "Digest mismatch" in text else ""
  return f"{what}{type(error).__name__}: {text}" if text else f"{what}{type(error).__name__}"


def _innermost(error: BaseException) -> BaseException:
  """The first error of a chain (TensorStore's, under the bare `Exception` Orbax wraps it in)."""
  seen = {id(error)}
  while True:
    inner = error.__cause__ or error.__context__
    if inner is None or id(inner) in seen or isinstance(inner, LeafReadError):
      return error
    seen.add(id(inner))
    error = inner


class TransplantError(ValueError):
  """A key of a `PartialLoader` matches nothing, or shapes differ; names the key."""


class PeerSaveError(RuntimeError):
  """Another process failed the save this process was finishing (multi-process runs)."""


class CliError(Exception):
  """A problem the user of the `kckpt` command can fix (bad path, unknown step): printed as one line, exit 2."""
