"""The bytes a restore reads at once, bounded, with the reads let through in the order they ask.

A restore into a target reads a batch of leaves in one Orbax call (a tree of
thousands of small leaves in one call, see `_reader.restore_batches`), and
Orbax starts every shard's read at once: each shard's host buffer, and what
the C heap keeps of it once placed, can be alive at the same time. A donated
restore of 9001 small leaves grew peak memory by 57-65% of the state; with
at most 64 MiB read at once, 24-25% (fresh processes, three runs each).

While a kckpt restore is `limiting`, each shard Orbax reads (its
``_read_shard``, wrapped by `_read_progress`) first waits for room in an
`InOrderLimit` of its event loop. Orbax's own limiter
(``StorageOptions.restore_concurrent_gb``, left as it is) bounds the same
thing but wakes every waiting read at each release (a 9001-leaf restore
spent most of its time there) and refuses a shard larger than its limit;
this one wakes the reads next in line only, and lets a larger shard through
alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Iterator

_lock = threading.Lock()
_scopes: list[int] = []  # the limit of each kckpt restore limiting now
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InOrderLimit] = weakref.WeakKeyDictionary()


class InOrderLimit:
  """Lets requests of bytes through in the order they ask while at most `limit` bytes are through at once.

  A request larger than `limit` goes through alone. Bound to one event
  loop (the first one it waits in).

  >>> async def demo():
  ...   limit = InOrderLimit(10)
  ...   async with limit.admitted(8):
  ...     later = asyncio.ensure_future(limit.acquire(5))  # 8 + 5 > 10: waits
  ...     await asyncio.sleep(0)
  ...     print(later.done(), limit.used)
  ...   await later
  ...   print(limit.used, limit.peak)
  >>> asyncio.run(demo())
  False 8
  5 8
  """

  def __init__(self, limit: int) -> None:
    if limit <= 0:
      raise ValueError(f"InOrderLimit: the limit must be a positive number of bytes, not {limit}")
    self.limit = limit
    self.used = 0  # bytes through now
    self.peak = 0  # the most bytes through at once so far
    self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

  def _fits(self, nbytes: int) -> bool:
    return self.used == 0 or self.used + nbytes <= self.limit

  def _take(self, nbytes: int) -> None:
    self.used += nbytes
    self.peak = max(self.peak, self.used)

  async def acquire(self, nbytes: int) -> None:
    """Waits until every earlier request is through and `nbytes` fit (or nothing is through)."""
    if not self._waiting and self._fits(nbytes):
      self._take(nbytes)
      return
    turn = asyncio.get_running_loop().create_future()
    self._waiting.append((nbytes, turn))
    try:
      await turn
    except BaseException:  # cancelled while waiting, or right after its turn came
      if turn.done() and not turn.cancelled():
        self.release(nbytes)
      else:
        self._let_through()  # the requests behind it may fit now
      raise

  def release(self, nbytes: int) -> None:
    """Gives back the bytes of a request that was let through."""
    self.used -= nbytes
    self._let_through()

  def _let_through(self) -> None:
    while self._waiting:
      nbytes, turn = self._waiting[0]
      if turn.done():  # cancelled while waiting
        self._waiting.popleft()
        continue
      if not self._fits(nbytes):
        return
      self._waiting.popleft()
      self._take(nbytes)
      turn.set_result(None)

  @contextlib.asynccontextmanager
  async def admitted(self, nbytes: int) -> AsyncIterator[None]:
    """`acquire`, then `release` on the way out."""
    await self.acquire(nbytes)
    try:
      yield
    finally:
      self.release(nbytes)


@contextlib.contextmanager
def limiting(nbytes: int) -> Iterator[None]:
  """While inside, the shards Orbax reads in each event loop go through an `InOrderLimit` of `nbytes`.

  Scopes of restores running at once in one process (threads) share the
  smallest limit; each event loop (each Orbax call) has its own. Reads
  outside every scope are Orbax's, unchanged.
  """
  with _lock:
    _scopes.append(nbytes)
  try:
    yield
  finally:
    with _lock:
      _scopes.remove(nbytes)
      if not _scopes:
        _by_loop.clear()


def current() -> InOrderLimit | None:
  """The limit of the running event loop while a restore is `limiting`, else None (called per shard)."""
  if not _scopes:
    return None
  loop = asyncio.get_running_loop()
  with _lock:
    if not _scopes:
      return None
    limit = _by_loop.get(loop)
    if limit is None:
      limit = _by_loop[loop] = InOrderLimit(min(_scopes))
    return limit
