"""How saves and restores are measured: `TransferStats`, and the two moments of an async save."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from etils import epath

from kckpt._types import Step

log = logging.getLogger("kckpt")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferStats:
  """What one save or restore moved and how long it took.

  Attributes:
    operation: ``"save"`` or ``"restore"``.
    step: the step saved or restored.
    bytes: bytes of array data in the state (every array, NumPy value and
      Python scalar of its pytree items; JSON items are not counted).
    blocked_seconds: how long the call (`save` or `restore`) blocked the
      caller.
    seconds: from the start of the call until the step was durable (a save)
      or returned (a restore). None while an async save is still being
      written: it is filled in when the background save finishes.
    async_save: whether the save ran in the background.
    tier: where the step was read: ``"persistent"`` (the workdir) or
      ``"local"`` (the local tier of `Checkpointer(local_workdir=...)`).

  >>> stats = TransferStats(operation="restore", step=10, bytes=5 * 10**8, blocked_seconds=0.5, seconds=0.5)
  >>> stats.mb_per_s, stats.describe()
  (1000.0, 'restored step 10: 500.0 MB in 0.500 s (1000 MB/s), caller blocked 0.500 s')
  """

  operation: str
  step: Step
  bytes: int
  blocked_seconds: float
  seconds: float | None
  async_save: bool = False
  tier: str = "persistent"

  @property
  def done(self) -> bool:
    """False while an async save is still being written."""
    return self.seconds is not None

  @property
  def mb_per_s(self) -> float | None:
    """Throughput in MB/s (10**6 bytes per second); None while not done."""
    if self.seconds is None:
      return None
    return self.bytes / max(self.seconds, 1e-9) / 1e6

  def describe(self) -> str:
    """One line for a log: ``saved step 10: 536.9 MB in 0.61 s (880 MB/s), caller blocked 0.02 s``."""
    verb = "saved" if self.operation == "save" else "restored"
    where = f"{verb} step {self.step}: {self.bytes / 1e6:.1f} MB"
    if self.seconds is None:
      return f"{where} being written in the background, caller blocked {self.blocked_seconds:.3f} s"
    return f"{where} in {self.seconds:.3f} s ({self.mb_per_s:.0f} MB/s), caller blocked {self.blocked_seconds:.3f} s"


class SaveTelemetry:
  """Builds a save's `TransferStats` from two moments: `save` returned, and the step is durable.

  For an async save the second comes from a background thread, possibly
  before the first (a tiny save); the stats are published at the first moment
  and completed (and logged) once both are known.
  """

  def __init__(
    self,
    publish: Callable[[TransferStats], None],
    directory: epath.Path,
    *,
    step: Step,
    nbytes: int,
    started: float,
    async_save: bool,
  ):
    self._publish_stats, self._directory = publish, directory
    self._step, self._nbytes, self._started, self._async = step, nbytes, started, async_save
    self._returned: float | None = None
    self._durable: float | None = None
    self._lock = threading.Lock()

  def returned(self, now: float) -> None:
    with self._lock:
      self._returned = now
      self._publish()

  def durable(self, now: float) -> None:
    with self._lock:
      self._durable = now
      if self._returned is not None:
        self._publish()

  def _publish(self) -> None:
    assert self._returned is not None
    stats = TransferStats(
      operation="save",
      step=self._step,
      bytes=self._nbytes,
      blocked_seconds=self._returned - self._started,
      seconds=None if self._durable is None else self._durable - self._started,
      async_save=self._async,
    )
    self._publish_stats(stats)
    if stats.done:
      log.info("kckpt %s [%s]", stats.describe(), self._directory)


def restore_stats(step: Step, nbytes: int, started: float, directory: Any, *, tier: str = "persistent") -> TransferStats:
  """The stats of a restore that started at `started` (`time.perf_counter()`) and ends now; logged."""
  elapsed = time.perf_counter() - started
  stats = TransferStats(operation="restore", step=step, bytes=nbytes, blocked_seconds=elapsed, seconds=elapsed, tier=tier)
  log.info("kckpt %s [%s]", stats.describe(), directory)
  return stats
