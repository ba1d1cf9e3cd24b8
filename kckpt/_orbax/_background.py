"""One worker thread for the CPU work kckpt adds beside Orbax's I/O: a save's statistics and checksums, a restore's checks.

A save is mostly the kernel copying bytes into the page cache from
TensorStore's threads, and on a host with few cores, the CPU that kckpt
adds to each array competes with those copies. Handed to Orbax's default
executor (``asyncio.to_thread``: up to ``cpu_count + 4`` threads), one
reduction per array ran on every core at once, and the writes slowed down
by more than the work itself took: GPT-2-sized sync saves took 1.22x as long
as tuned Orbax's (10 alternated rounds on 2 cores, paired medians; the speed
guide has the figures). Here the work runs in order on a single thread, so
it takes at most one core from the writes (and from the training loop
during an async save): 0.99x. Lowering that thread's priority as well
(``nice`` 5 or 10) made no difference there (7 rounds each), and would let
a busy host delay the commit, which waits for the reductions: not done.

A restore's checks of shards over 1 MiB that Orbax read (`_read_checks`:
formats other than kckpt's default, which `_direct_reads` reads and hashes
on its own threads) run there too, so that they also take at most one core
from the reads.

`run` is awaited from Orbax's event loops; the thread is started at its
first use in each process (a forked child starts its own).

>>> import asyncio
>>> asyncio.run(run(sum, [1, 2, 3]))
6
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _forget_in_child() -> None:
  # A fork copies the executor but not its thread (work given to it would wait forever), and
  # the lock as another thread may have held it.
  global _executor, _lock
  _executor, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _worker() -> concurrent.futures.ThreadPoolExecutor:
  global _executor
  with _lock:
    if _executor is None:
      _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kckpt-background")
    return _executor


async def run(fn: Callable[..., T], *args: Any) -> T:
  """``await asyncio.to_thread(fn, *args)``, on kckpt's one worker thread (with the caller's context variables)."""
  context = contextvars.copy_context()
  return await asyncio.get_running_loop().run_in_executor(_worker(), functools.partial(context.run, fn, *args))
