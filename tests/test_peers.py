"""The copy of packed shards between processes (`kckpt._peers.PeerCopy`), on one process: a copy to itself.

With one process a shift of 0 sends each chunk through the same `ppermute`
program to this process, so the chunking, the flags, the timeouts and the
cancelling run for real here; the multi-process behaviour is in
``tests/integration/test_local_tier.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kckpt import _peers
from kckpt.errors import ProcessTimeoutError

CHUNK = 4096  # at least 4096 bytes: XLA's CPU client runs smaller programs in the calling thread


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  monkeypatch.setattr(_peers, "CHUNK_BYTES", CHUNK)


def buffer(size: int) -> np.ndarray:
  return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


def copy_of(data: np.ndarray, timeout_secs: float = 60) -> _peers.PeerCopy:
  return _peers.PeerCopy(data, [0], {0: int(data.size)}, timeout_secs=timeout_secs)


def collect_in_background(copy: _peers.PeerCopy) -> tuple[threading.Thread, dict]:
  out: dict = {}

  def run():
    try:
      out["received"] = copy.collect()
    except Exception as e:  # pylint: disable=broad-exception-caught  # looked at by the test
      out["error"] = e

  thread = threading.Thread(target=run)
  thread.start()
  return thread, out


def test_every_byte_arrives_through_chunks_dispatched_a_few_at_a_time():
  data = buffer(10 * CHUNK + 123)
  copy = copy_of(data)
  assert copy.chunks == 11
  copy.advance(_peers.IN_FLIGHT)
  assert copy.dispatched == _peers.IN_FLIGHT  # the caller only dispatched the first ones
  thread, out = collect_in_background(copy)
  copy.finish()  # the rest, each once fewer than IN_FLIGHT are held
  thread.join()
  assert "error" not in out and np.array_equal(out["received"][0], data)
  assert copy.collected == copy.chunks


def test_a_chunk_that_cannot_be_placed_goes_as_flagged_zeros_and_fails_both_ends():
  class FailingChunk(np.ndarray):
    def __getitem__(self, key):
      if isinstance(key, slice) and key.start == 2 * CHUNK:
        raise MemoryError("injected")
      return super().__getitem__(key)

  copy = copy_of(buffer(5 * CHUNK).view(FailingChunk))
  copy.advance(copy.chunks)
  thread, out = collect_in_background(copy)
  copy.finish()
  thread.join()
  message = str(out["error"])
  assert isinstance(out["error"], _peers.PeerTransferError)
  assert "chunk 2 could not be placed: MemoryError: injected" in message  # the sender's side
  assert "process 0 sent zeros for chunk 2" in message  # the receiver's side, from the flag
  assert not copy.received[0][2 * CHUNK : 3 * CHUNK].any()


def test_finish_raises_when_no_chunk_moves_for_the_timeout():
  copy = copy_of(buffer(3 * CHUNK), timeout_secs=0.5)
  copy.advance(_peers.IN_FLIGHT)  # dispatched, but nothing here collects them (a stuck background thread)
  with pytest.raises(ProcessTimeoutError, match=r"no chunk of the local tier's copy between processes moved for 0.5 s \(0 of 3"):
    copy.finish()


def test_a_cancelled_copy_stops_collecting_and_never_commits():
  copy = copy_of(buffer(3 * CHUNK))
  copy.advance(copy.chunks)  # every chunk dispatched: only the flag can stop the collector now
  copy.cancel()  # the caller gave up (its finish raised)
  thread, out = collect_in_background(copy)
  thread.join()
  assert isinstance(out["error"], _peers.PeerTransferError) and "given up" in str(out["error"])
  with pytest.raises(_peers.PeerTransferError, match="not committed"), copy.committing():
    pytest.fail("committed after the copy was given up")


def test_a_copy_whose_collector_never_runs_is_still_moved_to_its_end():
  copy = copy_of(buffer(7 * CHUNK))
  copy.advance(_peers.IN_FLIGHT)
  copy.abandon()  # the background work failed before collecting: the peers still wait for every chunk
  copy.finish()
  assert copy.dispatched == copy.chunks and copy.collected == 0
