"""One low-priority worker thread for the CPU work kckpt adds to a save (statistics, checksums).

A save is mostly the kernel copying bytes into the page cache from
TensorStore's threads, and on a host with few cores, the CPU that kckpt
adds to each array competes with those copies. Handed to Orbax's default
executor (``asyncio.to_thread``: up to ``cpu_count + 4`` threads), one
reduction per array ran on every core at once, and the writes slowed down
by more than the work itself took: GPT-2-sized sync saves took 1.28x as long
as tuned Orbax's (14 alternated rounds on 2 cores; see the speed guide).
Here the work runs in order on a single thread whose scheduling priority is
lowered (``nice`` 10, Linux only: the training loop, the data pipeline and
the writes go first, and the reductions fill the gaps): 0.96x.

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
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["NICE", "run"]

T = TypeVar("T")

NICE = 10  # added to the worker's nice value: lower priority than the process's other threads

_lock = threading.Lock()
_executor: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid that made it, executor)


def _lower_priority() -> None:
  # On Linux a thread's nice value is its own (setpriority on its thread id); elsewhere
  # PRIO_PROCESS would name the whole process, so the priority is left alone there.
  if sys.platform.startswith("linux"):
    try:
      os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    except OSError:  # a sandbox that forbids it: the work still runs, at the usual priority
      pass


def _worker() -> concurrent.futures.ThreadPoolExecutor:
  global _executor
  with _lock:
    if _executor is None or _executor[0] != os.getpid():  # a fork copies the executor, not its thread
      pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kckpt-background", initializer=_lower_priority)
      _executor = (os.getpid(), pool)
    return _executor[1]


async def run(fn: Callable[..., T], *args: Any) -> T:
  """``await asyncio.to_thread(fn, *args)``, on the low-priority worker (with the caller's context variables)."""
  context = contextvars.copy_context()
  return await asyncio.get_running_loop().run_in_executor(_worker(), functools.partial(context.run, fn, *args))
