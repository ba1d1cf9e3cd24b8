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


class HtmlTable:
  """The first ``<table class="CLASS">`` of an HTML page, as text: its header cells and its rows.

  Each row is ``(attributes of its <tr>, [text of each cell])``; the text of a
  cell joins the text of everything inside it (markers included).
  """

  def __init__(self, page: str, css_class: str):
    from html.parser import HTMLParser  # pylint: disable=import-outside-toplevel

    table = self
    table.header, table.rows = [], []

    class Parser(HTMLParser):
      depth = 0  # inside the wanted table (tables nested in it counted)
      done = False
      cell = None
      row = None

      def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and not self.done and (self.depth or css_class in (attrs.get("class") or "").split()):
          self.depth += 1
        elif self.depth == 1 and tag == "tr":
          self.row = (attrs, [])
        elif self.depth == 1 and tag in ("td", "th") and self.row is not None:
          self.cell = []

      def handle_endtag(self, tag):
        if tag == "table" and self.depth:
          self.depth -= 1
          self.done = self.depth == 0
        elif self.depth == 1 and tag in ("td", "th") and self.cell is not None:
          self.row[1].append(" ".join("".join(self.cell).split()))
          self.cell = None
        elif self.depth == 1 and tag == "tr" and self.row is not None:
          attrs, cells = self.row
          if not table.header and not table.rows and "data-step" not in attrs:
            table.header = cells
          else:
            table.rows.append((attrs, cells))
          self.row = None

      def handle_data(self, data):
        if self.cell is not None:
          self.cell.append(data)

    Parser().feed(page)

  def column(self, name: str) -> list[str]:
    """The cells of the column whose header is `name` (or `name` and a marker: ``eval.loss ★ min``)."""
    index = next(i for i, h in enumerate(self.header) if h == name or h.startswith(name + " "))
    return [cells[index] for _, cells in self.rows]
