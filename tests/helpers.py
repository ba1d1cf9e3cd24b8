"""Small helpers shared by the tests."""

import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def subprocess_env(**extra):
  """The environment for a Python subprocess that imports kckpt on the CPU."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["PYTHONUNBUFFERED"] = "1"
  env.update({k: str(v) for k, v in extra.items()})
  return env


PYTHON = sys.executable


class Output:
  """A program's output lines, read by a thread: the pipe never fills and every wait has a deadline."""

  def __init__(self, stream):
    self.lines = []
    self.closed = False
    self._changed = threading.Condition()
    self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
    self._thread.start()

  def _read(self, stream):
    for line in stream:
      with self._changed:
        self.lines.append(line.rstrip("\n"))
        self._changed.notify_all()
    with self._changed:
      self.closed = True
      self._changed.notify_all()

  def text(self):
    with self._changed:
      return "\n".join(self.lines)

  def has(self, line):
    with self._changed:
      return line in self.lines

  def wait_for(self, text, timeout=120):
    """Waits until a line holds `text`; returns that line."""
    deadline = time.monotonic() + timeout
    with self._changed:
      while True:
        found = [line for line in self.lines if text in line]
        if found:
          return found[0]
        remaining = deadline - time.monotonic()
        assert not self.closed, f"the program exited before printing {text!r}:\n" + "\n".join(self.lines)
        assert remaining > 0, f"the program did not print {text!r} within {timeout} s:\n" + "\n".join(self.lines)
        self._changed.wait(remaining)

  def join(self, timeout=30):
    self._thread.join(timeout)
    assert not self._thread.is_alive(), "the program's output never ended"
