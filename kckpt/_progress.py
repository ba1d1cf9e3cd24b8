"""Progress people can see: a tqdm bar on a terminal, nothing anywhere else.

Used by sync saves and by restores into a target (bytes, MB/s, leaves), and
by the ``kckpt`` command's status line. A bar appears only when the stream is
a terminal and the transfer has lasted 3 s (``KCKPT_PROGRESS_DELAY_SECS``),
so quick saves and restores, logs and pipes stay clean; ``KCKPT_PROGRESS=0``
turns every bar off.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO


def _delay_secs() -> float:
  """A transfer shorter than this shows nothing: 3 s, or ``KCKPT_PROGRESS_DELAY_SECS``."""
  try:
    return float(os.environ.get("KCKPT_PROGRESS_DELAY_SECS", "3"))
  except ValueError:
    return 3.0


def _size() -> dict[str, int]:
  """The terminal's width and height for tqdm (80 x 24 when it reports none, as a fresh pseudo-terminal does)."""
  size = shutil.get_terminal_size((80, 24))
  return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def wanted(stream: TextIO | None = None) -> bool:
  """Whether progress goes to `stream` (stderr by default): a terminal, and not turned off.

  >>> import io
  >>> wanted(io.StringIO())
  False
  """
  stream = sys.stderr if stream is None else stream
  if os.environ.get("KCKPT_PROGRESS", "1") == "0":
    return False
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class Transfer:
  """A save's or restore's progress: bytes (with the rate) and leaves done, on stderr's terminal.

  Thread-safe (`advance` is called from Orbax's background threads); a no-op
  when `wanted()` is False.
  """

  def __init__(self, what: str, *, total_bytes: int, total_leaves: int, delay_secs: float | None = None, stream: Any = None):
    self._lock = threading.Lock()
    self._leaves = 0
    self._total_leaves = total_leaves
    self._bar: Any = None
    if wanted(stream):
      from tqdm.auto import tqdm  # type: ignore[import-untyped]  # pylint: disable=import-outside-toplevel  # only when shown

      self._bar = tqdm(
        total=total_bytes,
        desc=what,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=_delay_secs() if delay_secs is None else delay_secs,
        leave=False,
        file=stream if stream is not None else sys.stderr,
        **_size(),
        postfix=f"0/{total_leaves} leaves",
      )

  @property
  def shown(self) -> bool:
    return self._bar is not None

  def advance(self, nbytes: int, leaves: int = 1) -> None:
    if self._bar is None:
      return
    with self._lock:
      self._leaves += leaves
      self._bar.set_postfix_str(f"{self._leaves}/{self._total_leaves} leaves", refresh=False)
      self._bar.update(nbytes)

  def close(self) -> None:
    if self._bar is not None:
      with self._lock:
        self._bar.close()
        self._bar = None


class StatusLine:
  """One line of status, rewritten in place on a terminal (nothing elsewhere): the ``kckpt`` command's progress."""

  def __init__(self, stream: TextIO | None = None, *, min_interval_secs: float = 0.1):
    self._stream = sys.stderr if stream is None else stream
    self.enabled = wanted(self._stream)
    self._min_interval = min_interval_secs
    self._last = 0.0
    self._bar: Any = None

  def update(self, text: str, *, force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.monotonic()
    if not force and now - self._last < self._min_interval:
      return
    self._last = now
    if self._bar is None:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

      self._bar = tqdm(bar_format="{desc}", file=self._stream, leave=False, **_size())
    self._bar.set_description_str(text, refresh=True)

  def clear(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def callback(self, prefix: str = "") -> Callable[[str], None] | None:
    """A `progress` argument for `kckpt.inspect` that shows its lines after `prefix` (None when disabled)."""
    if not self.enabled:
      return None
    return lambda text: self.update(prefix + text)
