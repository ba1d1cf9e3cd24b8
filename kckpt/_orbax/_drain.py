"""A failed kckpt read through Orbax ends whole: nothing of it still runs once the error is raised.

Orbax 0.12 runs each read in a fresh event loop (``asyncio_utils.run_sync``
→ ``_run_sync_via_new_loop``) around an ``asyncio.gather`` of every array,
and closes the loop as soon as the gather fails. The other arrays' tasks are
left pending, their TensorStore reads still running: each one that finishes
later calls back into the closed loop (``RuntimeError: Event loop is
closed``, printed with its traceback by TensorStore's thread), the abandoned
coroutines print ``Exception ignored in: <coroutine ...>`` when collected,
and the reads go on using memory and CPU after the caller got the error. One
flipped bit in a step of 40 arrays printed up to 130 such lines.

While a kckpt read is `drained` (on this thread), Orbax's loop runner is
kckpt's: the same loop and the same result, and on an error it waits for
every task of the loop still pending before closing it, then raises the
first error, unchanged. A `jax.Array` shard that had not started its read
does not start it (`abandoned`: kckpt's shard reader, `_read_progress`,
raises `ReadAbandoned` instead, when the shard's turn within the restore's
byte bound comes), so the wait is mostly for the reads already running;
NumPy and scalar leaves (Orbax starts all of an item's at once) are read
to the end. A ``KeyboardInterrupt`` or ``SystemExit`` is raised at once,
as by Orbax's runner, and one during the wait ends it. Orbax calls outside
a drained scope (plain Orbax in the same process, kckpt's saves) run
Orbax's own runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from orbax.checkpoint._src import asyncio_utils as _asyncio_utils  # Orbax 0.12 internal: see install

_T = TypeVar("_T")

# A safety net, not a synchronisation: a pending task that waits on something only the failed call would
# have given (none is known), or a stalled remote read, must not hold the error back for long.
WAIT_LIMIT_S = 60.0


class ReadAbandoned(RuntimeError):
  """A read that did not start because another read of the same Orbax call had failed (never the error raised)."""


_local = threading.local()
_abandoned: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_original = _asyncio_utils._run_sync_via_new_loop  # pylint: disable=protected-access
_lock = threading.Lock()
_installed = False


@contextlib.contextmanager
def drained() -> Iterator[None]:
  """While inside, an Orbax call on this thread that fails returns only once every task it started has ended."""
  install()
  depth = getattr(_local, "depth", 0)
  _local.depth = depth + 1
  try:
    yield
  finally:
    _local.depth = depth


def abandoned() -> bool:
  """Whether the running Orbax call has failed already: a read not yet started should not start."""
  try:
    return asyncio.get_running_loop() in _abandoned
  except RuntimeError:
    return False


def abandoned_loop(loop: asyncio.AbstractEventLoop) -> bool:
  """Whether the Orbax call running on `loop` has failed or ended: safe from any thread (a read looks between slabs)."""
  return loop.is_closed() or loop in _abandoned


def _run_sync_via_new_loop(coro: Coroutine[Any, Any, _T]) -> _T:
  """Orbax's runner (a fresh loop, ``run_until_complete``, ``close``), waiting out the pending tasks on an error."""
  if not getattr(_local, "depth", 0):
    return _original(coro)
  loop = asyncio.new_event_loop()
  # Weak: a task that is done (and dropped by Orbax) is not kept alive, nor its result (a shard's buffer).
  tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

  def task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
    task = asyncio.Task(coro, loop=loop, **kwargs)
    tasks.add(task)
    return task

  loop.set_task_factory(task_factory)
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  except Exception:  # (a KeyboardInterrupt or SystemExit is raised at once)
    pending = {task for task in list(tasks) if not task.done()}
    if pending:
      _abandoned.add(loop)
      _wait_out(loop, pending)
    raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


def _wait_out(loop: asyncio.AbstractEventLoop, pending: set[asyncio.Task[Any]]) -> None:
  """Runs `loop` until the tasks of `pending` have ended (their own errors are read, so none is logged as lost)."""
  tasks = set(pending)
  # A KeyboardInterrupt while waiting ends the wait and is raised (its context: the read's error).
  done, left = loop.run_until_complete(asyncio.wait(tasks, timeout=WAIT_LIMIT_S))
  for task in done:
    if not task.cancelled():
      task.exception()  # marks it retrieved: the first error is the one raised
  if left:
    logging.getLogger("kckpt").warning(
      "kckpt: %d task(s) of a failed read were still running after %.0f s; the error is raised without them",
      len(left),
      WAIT_LIMIT_S,
    )


def install() -> None:
  """Puts kckpt's runner in Orbax's place (once; it runs Orbax's own outside `drained`)."""
  global _installed
  with _lock:
    if not _installed:
      # Orbax 0.12 internal: `asyncio_utils.run_sync` looks `_run_sync_via_new_loop` up on its module.
      _asyncio_utils._run_sync_via_new_loop = _run_sync_via_new_loop  # pylint: disable=protected-access
      _installed = True


def installed() -> bool:
  return _installed and _asyncio_utils._run_sync_via_new_loop is _run_sync_via_new_loop  # pylint: disable=protected-access
