"""Watching a run for new checkpoints: the loop behind `iter_new_checkpoints`.

Polls the list of finished steps (one directory listing per poll). Nothing is
copied and nothing is written, so an eval job can watch a folder it cannot
write to.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from kckpt._types import Step


def new_steps(
  list_steps: Callable[[], Sequence[Step]],
  *,
  after: Step | None = None,
  min_interval_secs: float = 0,
  timeout: float | None = None,
  timeout_fn: Callable[[], bool] | None = None,
  poll_interval_secs: float = 1.0,
  only_newest: bool = False,
  sleep: Callable[[float], None] = time.sleep,
  clock: Callable[[], float] = time.monotonic,
) -> Iterator[Step]:
  """Yields finished steps newer than `after`, in order, as they appear.

  Args:
    list_steps: returns the sorted finished steps (a fresh listing each call).
    after: yield only steps after this one. None: start with the newest step
      that exists now (an eval job started late evaluates the current model,
      then every later one).
    min_interval_secs: at least this long between two yields.
    timeout: stop after this many seconds without a new step, once
      `timeout_fn()` is true (or when no `timeout_fn` is given). None: never
      time out, except when `timeout_fn` is given and true.
    timeout_fn: e.g. "the trainer wrote its end marker".
    poll_interval_secs: sleep between listings.
    only_newest: yield only the newest of the new steps at each poll (for
      evaluators slower than the trainer) instead of every step.
  """
  last = after
  if last is None:
    existing = list_steps()
    if existing:
      last = existing[-1] - 1  # so that the newest existing step is yielded first
  last_yield_time: float | None = None
  last_new_time = clock()
  while True:
    pending = [s for s in list_steps() if last is None or s > last]
    if pending:
      if only_newest and last_yield_time is not None and min_interval_secs:
        wait = last_yield_time + min_interval_secs - clock()
        if wait > 0:  # wait first, then take the newest step there is by then
          sleep(wait)
          pending = [s for s in list_steps() if last is None or s > last] or pending
      batch = pending[-1:] if only_newest else pending
      for step in batch:
        if last_yield_time is not None and min_interval_secs:
          wait = last_yield_time + min_interval_secs - clock()
          if wait > 0:
            sleep(wait)
        last = step
        last_yield_time = clock()
        yield step
        last_new_time = clock()
      continue
    timed_out = timeout is not None and clock() - last_new_time >= timeout
    if timed_out or (timeout is None and timeout_fn is not None):
      if timeout_fn is None or timeout_fn():
        # The end may have come with a last step: list once more before stopping.
        if not any(last is None or s > last for s in list_steps()):
          return
        continue
    sleep(poll_interval_secs)
