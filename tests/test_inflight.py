"""The bound on the bytes a restore reads at once (kckpt/_orbax/_inflight.py), alone and in real restores."""

import asyncio
import random

import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt._orbax import _inflight, _reader


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

  class Recording(_inflight.InOrderLimit):
    def __init__(self, limit):
      super().__init__(limit)
      limits.append(self)

  monkeypatch.setattr(_inflight, "InOrderLimit", Recording)
  monkeypatch.setattr(_reader, "RESTORE_INFLIGHT_MIN_BYTES", 12 * 1024)
  out = kckpt.Checkpointer.open(tmp_path).restore({k: jnp.zeros((32, 32)) for k in state})
  for name, leaf in state.items():
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(leaf))
  assert limits and all(lim.limit == 12 * 1024 for lim in limits)
  assert max(lim.peak for lim in limits) <= 12 * 1024 and all(lim.used == 0 for lim in limits)
  assert not _inflight._scopes and not _inflight._by_loop  # pylint: disable=protected-access
  # Reads outside a restore into a target are not bounded.
  limits.clear()
  as_saved = kckpt.Checkpointer.open(tmp_path).restore()
  np.testing.assert_array_equal(as_saved["w3"], np.full((32, 32), 3.0))
  assert not limits
