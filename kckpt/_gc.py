"""Python's cyclic garbage collector, paused while kckpt reads a step (and while a save blocks its caller).

Orbax handles each array of a tree in Python: a read spec, a few tasks and
futures, metadata objects. A restore of thousands of leaves makes millions of
short-lived objects, and the collections they trigger walk the tracked
objects of the process (CPython 3.11-3.13: every 700 net allocations of
tracked objects, an older generation on every 11th run, and all of them once
enough objects have survived since the last full walk). On a deep state of
9001 small leaves that was a third of a restore's time (16.3 s with the
collector on against 10.5 s paused, same run).

Reference counting frees nearly everything a read makes as it goes; what
little is cyclic is collected by the first collection after the pause (the
next allocation starts it: the allocation count kept rising). The collector
is process-wide, so the pause is too: other threads (a data loader, the
training loop while an eval thread restores, the background commit of the
previous async save that a new save waits for) run without it meanwhile.
Nested and concurrent pauses share one: the collector resumes when the last
ends, if it was on when the first began (a `gc.disable()` made by another
thread during a pause is undone then). ``KCKPT_PAUSE_GC=0`` in the
environment turns the pause off.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator

# Re-entrant: a signal handler that saves can run on the main thread while it holds the lock.
_lock = threading.RLock()
_depth = 0  # pauses open now
_resume = False  # whether the collector was on when the first of them began


def enabled() -> bool:
  """Whether kckpt pauses the collector (``KCKPT_PAUSE_GC`` is not ``0``)."""
  return os.environ.get("KCKPT_PAUSE_GC", "1").strip() != "0"


@contextlib.contextmanager
def paused() -> Iterator[None]:
  """Python's cyclic GC is off while inside (if it was on), then on again.

  >>> import gc
  >>> with paused():
  ...   gc.isenabled()
  False
  >>> gc.isenabled()
  True
  """
  if not enabled():
    yield
    return
  global _depth, _resume
  entered = False
  try:
    with _lock:
      if _depth == 0:
        _resume = gc.isenabled()
        gc.disable()
      _depth += 1
      entered = True
    yield
  finally:
    if entered:
      with _lock:
        _depth -= 1
        if _depth == 0 and _resume:
          gc.enable()
