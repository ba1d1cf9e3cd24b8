"""The bound on the bytes a restore reads at once (kckpt/_orbax/_inflight.py), alone and in real restores."""

import asyncio
import random

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import kckpt
from kckpt._orbax import _inflight, _read_progress, _reader


def run(coro):
  return asyncio.run(coro)


def test_requests_go_through_in_the_order_they_ask():
  """A large request at the head is not overtaken by smaller ones that would fit (it would starve)."""

  async def main():
    limit = _inflight.InOrderLimit(10)
    order = []

    async def request(name, nbytes, hold):
      async with limit.admitted(nbytes):
        order.append(name)
        await hold.wait()

    holds = {name: asyncio.Event() for name in "abcd"}
    tasks = [asyncio.ensure_future(request(n, b, holds[n])) for n, b in (("a", 6), ("b", 8), ("c", 2), ("d", 2))]
    await asyncio.sleep(0)
    assert order == ["a"] and limit.used == 6  # c (2 bytes) fits but waits behind b
    holds["a"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["a", "b", "c"] and limit.used == 10  # b then c, d waits
    holds["b"].set()
    holds["c"].set()
    holds["d"].set()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d"] and limit.used == 0 and limit.peak == 10

  run(main())


def test_a_request_larger_than_the_limit_goes_through_alone():
  async def main():
    limit = _inflight.InOrderLimit(10)
    seen = []

    async def request(nbytes):
      async with limit.admitted(nbytes):
        seen.append(limit.used)
        await asyncio.sleep(0)

    await asyncio.gather(request(4), request(25), request(4))
    assert seen == [4, 25, 4] and limit.peak == 25

  run(main())
  with pytest.raises(ValueError, match="positive number of bytes, not 0"):
    _inflight.InOrderLimit(0)


def test_a_request_cancelled_while_waiting_lets_the_ones_behind_it_through():
  async def main():
    limit = _inflight.InOrderLimit(10)
    await limit.acquire(8)
    big = asyncio.ensure_future(limit.acquire(9))
    small = asyncio.ensure_future(limit.acquire(2))
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    big.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert small.done() and limit.used == 10  # the 2 bytes behind the cancelled request fit
    limit.release(8)
    limit.release(2)
    assert limit.used == 0

  run(main())


def test_bytes_come_back_when_a_request_fails_is_cancelled_after_its_turn_or_is_closed_while_waiting():
  async def main():
    limit = _inflight.InOrderLimit(10)
    with pytest.raises(RuntimeError, match="read failed"):
      async with limit.admitted(6):
        raise RuntimeError("read failed")
    assert limit.used == 0
    await limit.acquire(8)
    turned = asyncio.ensure_future(limit.acquire(4))
    await asyncio.sleep(0)
    limit.release(8)  # its turn comes (the future is done) before the task runs again...
    turned.cancel()  # ...and it is cancelled then: it gives the bytes back
    with pytest.raises(asyncio.CancelledError):
      await turned
    assert limit.used == 0
    await limit.acquire(8)
    closed = limit.acquire(4)  # a coroutine closed while it waits (the task dropped, garbage-collected)
    closed.send(None)
    closed.close()
    limit.release(8)
    assert limit.used == 0 and not limit._waiting  # pylint: disable=protected-access

  run(main())


def test_many_requests_never_exceed_the_limit():
  async def main():
    limit = _inflight.InOrderLimit(100)
    rng = random.Random(0)
    over = []

    async def request(nbytes):
      async with limit.admitted(nbytes):
        if limit.used > 100 and limit.used != nbytes:
          over.append(limit.used)
        for _ in range(rng.randrange(3)):
          await asyncio.sleep(0)

    await asyncio.gather(*(request(rng.randrange(1, 60)) for _ in range(500)))
    assert not over and limit.used == 0 and 60 <= limit.peak <= 100

  run(main())


@pytest.mark.parametrize("checksums", [True, False])
def test_a_restore_reads_at_most_its_bound_at_once(tmp_path, monkeypatch, checksums):
  """Every shard of a restore into a target waits its turn: the bytes read at once stay within the bound."""
  state = {f"w{i}": jnp.full((32, 32), float(i)) for i in range(24)}  # 4 KiB each, 96 KiB in all
  storage = kckpt.StorageOptions(checksums=checksums)
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False, storage=storage) as ckpt:
    ckpt.save(state, step=1)
  limits = []

  asked = []

  class Recording(_inflight.InOrderLimit):
    def __init__(self, limit):
      super().__init__(limit)
      limits.append(self)

    async def acquire(self, nbytes):
      asked.append(nbytes)
      await super().acquire(nbytes)

  monkeypatch.setattr(_inflight, "InOrderLimit", Recording)
  monkeypatch.setattr(_reader, "RESTORE_INFLIGHT_MIN_BYTES", 12 * 1024)
  out = kckpt.Checkpointer.open(tmp_path).restore({k: jnp.zeros((32, 32)) for k in state})
  for name, leaf in state.items():
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(leaf))
  assert limits and all(lim.limit == 12 * 1024 for lim in limits)
  assert sorted(asked) == [4096] * 24  # every shard, counted at its size
  assert max(lim.peak for lim in limits) <= 12 * 1024 and all(lim.used == 0 for lim in limits)
  assert _inflight._scope.get() is None  # pylint: disable=protected-access
  # Plain Orbax in the same process reads through the same (wrapped) shard reader, unbounded.
  limits.clear()
  plain = ocp.PyTreeCheckpointer().restore(tmp_path / "checkpoints" / "ckpt_1" / "default")
  np.testing.assert_array_equal(np.asarray(plain["w3"]), np.full((32, 32), 3.0))
  assert _read_progress.installed() and not limits and len(asked) == 24
