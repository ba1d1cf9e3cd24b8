"""Preemption: SIGTERM is recorded, not fatal, until the step is saved.

A `Checkpointer` that handles SIGTERM installs one process-wide handler (the
first `maybe_save`) and removes it at `close`; the handler only sets a flag,
and the next `maybe_save` saves on every process. `Preemption` is one
`Checkpointer`'s view: asked to stop, and whether the save for it is done.
"""

from __future__ import annotations

import signal
import threading
import weakref
from typing import Any

_sigterm = threading.Event()
_sigterm_lock = threading.Lock()
_sigterm_users = 0
_previous_handler: Any = None


def sigterm_received() -> bool:
  """Whether this process got SIGTERM while a `Checkpointer` handles it (forgotten when none does)."""
  return _sigterm.is_set()


def _on_sigterm(signum, frame) -> None:
  _sigterm.set()  # no logging here: the interrupted code may hold the logging lock
  previous = _previous_handler
  if callable(previous):
    previous(signum, frame)


def install_sigterm_handler() -> bool:
  """Records SIGTERM instead of dying (until the last `uninstall_sigterm_handler`).

  A Python handler installed before is still called. Only the main thread can
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


def uninstall_sigterm_handler() -> None:
  """Undoes one `install_sigterm_handler`; the last one restores the previous handler."""
  global _sigterm_users, _previous_handler
  if threading.current_thread() is not threading.main_thread():
    return
  with _sigterm_lock:
    if _sigterm_users == 0:
      return
    _sigterm_users -= 1
    if _sigterm_users == 0:
      _sigterm.clear()
      if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _previous_handler if _previous_handler is not None else signal.SIG_DFL)
      _previous_handler = None


class Preemption:
  """One `Checkpointer`'s preemption state (never part of its configuration)."""

  def __init__(self) -> None:
    self.requested = False  # `request_preemption()` was called
    self.reached = False  # the step saved for it is durable
    self._handler: weakref.finalize | None = None  # removes the SIGTERM handler (close, or GC)

  def handle_sigterm(self, owner: object) -> None:
    """Installs the SIGTERM handler for `owner` (once; a no-op off the main thread)."""
    if self._handler is None and install_sigterm_handler():
      self._handler = weakref.finalize(owner, uninstall_sigterm_handler)

  @property
  def pending(self) -> bool:
    """Whether this process was asked to stop and has not saved for it yet."""
    return not self.reached and (self.requested or (self._handler is not None and sigterm_received()))

  def release(self) -> None:
    """Removes the SIGTERM handler (the last one restores the handler there was before)."""
    if self._handler is not None:
      self._handler()
      self._handler = None
