"""The bytes a restore reads at once, bounded, with the reads let through in the order they ask.

A restore into a target reads a batch of leaves in one Orbax call (a tree of
thousands of small leaves in one call, see `_reader.restore_batches`), and
Orbax starts every shard's read at once: each shard's host buffer, and what
the C heap keeps of it once placed, can be alive at the same time. A donated
restore of 9001 small leaves grew peak memory by 57-65% of the state; with
at most 36 MiB read at once (a 32nd of it), 24%.

While a kckpt restore is `limiting`, each shard Orbax reads for it (its
``_read_shard``, wrapped by `_read_progress`) first waits for room in an
`InOrderLimit` of its event loop, and gives the room back once Orbax has
placed it (a checked shard is checked before that, while it holds its
room: see `_read_checks`). Orbax's own limiter (``StorageOptions.restore_concurrent_gb``,
which still applies when set) bounds the same thing but wakes every waiting
read at each release (a 9001-leaf restore spent most of its time there) and
refuses a shard larger than its limit; this one wakes the reads next in
line only, and lets a larger shard through alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import AsyncIterator, Iterator


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
    except BaseException:  # cancelled or closed while waiting, or right after its turn came
      if turn.done() and not turn.cancelled():
        self.release(nbytes)
      else:
        turn.cancel()  # a closed coroutine leaves its turn pending: it must not be given bytes
        self._let_through()  # the requests behind it may fit now
      raise

  def release(self, nbytes: int) -> None:
    """Gives back the bytes of a request that was let through."""
    self.used -= nbytes
    self._let_through()

  def _let_through(self) -> None:
    while self._waiting:
      nbytes, turn = self._waiting[0]
      if turn.done() or turn.get_loop().is_closed():  # cancelled while waiting, or its loop is gone (a failed read)
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


@dataclasses.dataclass
class _Scope:
  nbytes: int
  by_loop: dict[asyncio.AbstractEventLoop, InOrderLimit] = dataclasses.field(default_factory=dict)


# The restore limiting now, in the caller's context: Orbax runs each call's reads as tasks of a new event
# loop created in (or scheduled from) the caller's thread, and tasks inherit the context they start in.
_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("kckpt_restore_inflight", default=None)


@contextlib.contextmanager
def limiting(nbytes: int) -> Iterator[None]:
  """While inside, the shards Orbax reads for this caller go through an `InOrderLimit` of `nbytes`, one per event loop.

  Each Orbax call runs in an event loop of its own, so a restore in several
  calls has one limit per call, one after the other. Other threads' reads
  (another restore, plain Orbax) are not affected.
  """
  token = _scope.set(_Scope(nbytes))
  try:
    yield
  finally:
    _scope.reset(token)


def current() -> InOrderLimit | None:
  """The limit of the running event loop while its caller is `limiting`, else None (called per shard)."""
  scope = _scope.get()
  if scope is None:
    return None
  loop = asyncio.get_running_loop()
  limit = scope.by_loop.get(loop)
  if limit is None:
    limit = scope.by_loop[loop] = InOrderLimit(scope.nbytes)
  return limit
