"""Preemption: SIGTERM is recorded, not fatal, until the step is saved; then it is honoured.

The lifecycle, for a `Checkpointer` that handles SIGTERM (the default):

1. The first `maybe_save` installs one process-wide handler; it only sets a flag.
2. After SIGTERM, the next `maybe_save` (on every process: they vote) saves
   its step, waits until it is durable and sets `reached_preemption`.
3. Then the SIGTERM is honoured as the handler that was there before kckpt's
   would have: a Python handler is called (once, from that `maybe_save`); the
   default disposition ends the process with status 143 at the next
   `maybe_save`, as `SystemExit(143)` so that ``finally`` blocks and context
   managers run; an ignored SIGTERM stays ignored. A loop that checks
   `reached_preemption` and breaks never gets there: it closes cleanly.
4. `close` removes the handler (the last one restores the one before). A
   SIGTERM that arrived after the last `maybe_save` (so that no save was made
   for it) is honoured there, once the pending saves are durable: the earlier
   Python handler is called, the default disposition raises
   ``SystemExit(143)`` from `close`, an ignored one stays ignored.

`Preemption` is one `Checkpointer`'s view of it.
"""

from __future__ import annotations

import signal
import threading
import weakref
from typing import Any

_sigterm = threading.Event()
_honoured = threading.Event()  # the SIGTERM was honoured already (a `maybe_save` saved for it and passed it on)
_sigterm_lock = threading.Lock()
_sigterm_users = 0
_previous_handler: Any = None


def sigterm_received() -> bool:
  """Whether this process got SIGTERM while a `Checkpointer` handles it (forgotten when none does)."""
  return _sigterm.is_set()


# The exit status of a process ended by SIGTERM's default action, as shells report it.
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _sigterm.set()  # no logging here: the interrupted code may hold the logging lock


def previous_handler() -> Any:
  """The SIGTERM handler kckpt's replaced (`signal.SIG_DFL` when there was none)."""
  return signal.SIG_DFL if _previous_handler is None else _previous_handler


def install_sigterm_handler() -> bool:
  """Records SIGTERM instead of dying (until the last `uninstall_sigterm_handler`).

  The handler installed before is honoured once the step is saved (see the
  module docstring). Only the main thread can
  install signal handlers; elsewhere this returns False and does nothing.
  This replaces the handler of JAX's preemption service (a C handler), so
  ``multihost_utils.reached_preemption_sync_point`` no longer sees SIGTERM.
  """
  global _sigterm_users, _previous_handler
  if threading.current_thread() is not threading.main_thread():
    return False
  with _sigterm_lock:
    if _sigterm_users == 0:
      _previous_handler = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_users += 1
  return True


def uninstall_sigterm_handler() -> Any:
  """Undoes one `install_sigterm_handler`; the last one restores the previous handler.

  Returns the restored handler when this was the last one and a SIGTERM had
  arrived (for the caller to honour it), else None.
  """
  global _sigterm_users, _previous_handler
  if threading.current_thread() is not threading.main_thread():
    return None
  with _sigterm_lock:
    if _sigterm_users == 0:
      return None
    _sigterm_users -= 1
    if _sigterm_users != 0:
      return None
    received = _sigterm.is_set() and not _honoured.is_set()
    _sigterm.clear()
    _honoured.clear()
    restored = _previous_handler if _previous_handler is not None else signal.SIG_DFL
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
      signal.signal(signal.SIGTERM, restored)
    _previous_handler = None
    return restored if received else None


class Preemption:
  """One `Checkpointer`'s preemption state (never part of its configuration)."""

  def __init__(self) -> None:
    self.requested = False  # `request_preemption()` was called
    self.reached = False  # the step saved for it is durable
    self.exit_pending = False  # SIGTERM's default action is due at the next `maybe_save`
    self._undelivered: Any = None  # the handler to honour a SIGTERM no save was made for, at `close`
    self._handler: weakref.finalize | None = None  # removes the SIGTERM handler (close, or GC)

  def handle_sigterm(self, owner: object) -> None:
    """Installs the SIGTERM handler for `owner` (once; a no-op off the main thread)."""
    if self._handler is None and install_sigterm_handler():
      self._handler = weakref.finalize(owner, uninstall_sigterm_handler)

  @property
  def signalled(self) -> bool:
    """Whether this process got SIGTERM while this `Checkpointer` handled it."""
    return self._handler is not None and sigterm_received()

  @property
  def pending(self) -> bool:
    """Whether this process was asked to stop and has not saved for it yet."""
    return not self.reached and (self.requested or self.signalled)

  @property
  def will_exit(self) -> bool:
    """Whether this process got SIGTERM and its default action (ending the process) is due after the save."""
    previous = previous_handler()
    return self.signalled and not callable(previous) and previous != signal.SIG_IGN

  def saved(self, *, exit_all: bool = False) -> None:
    """The step saved for the preemption is durable: honour the SIGTERM as the handler before kckpt's would.

    `exit_all`: another process of the run will end now, so this one ends too
    (at the same call), instead of waiting for it at the next exchange.
    """
    self.reached = True
    self.exit_pending = self.will_exit or exit_all
    if self.signalled:
      _honoured.set()  # another Checkpointer's close must not pass it on again
    previous = previous_handler()
    if self.signalled and callable(previous):
      previous(signal.SIGTERM, None)

  def check_exit(self) -> None:
    """Ends the process as SIGTERM means (`SystemExit(143)`) when its default action is due."""
    if self.exit_pending:
      raise SystemExit(SIGTERM_EXIT_STATUS)

  def release(self) -> None:
    """Removes the SIGTERM handler (the last one restores the handler there was before).

    A SIGTERM no save was made for is remembered for `honour_undelivered`.
    """
    self._undelivered = None
    if self._handler is not None:
      unsaved = self.signalled and not self.reached
      alive = self._handler.detach() is not None  # not yet run by garbage collection
      self._handler = None
      restored = uninstall_sigterm_handler() if alive else None
      if unsaved and restored is not None:
        self._undelivered = restored

  def honour_undelivered(self) -> None:
    """After `close` finished the saves: honours a SIGTERM that came after the last `maybe_save`."""
    handler, self._undelivered = self._undelivered, None
    if handler is None or handler == signal.SIG_IGN:
      return
    if callable(handler):
      handler(signal.SIGTERM, None)
    else:  # the default disposition: end the process, as SIGTERM means
      raise SystemExit(SIGTERM_EXIT_STATUS)
