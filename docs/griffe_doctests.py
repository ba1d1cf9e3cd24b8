"""A griffe extension for the API reference: the docstrings' doctest examples shown as code.

kckpt's docstrings hold runnable examples (``>>>`` lines and their output,
checked by tests/test_docs.py) in plain text; Markdown would read them as
prose, and their brackets as links. This wraps each run of example lines in a
``pycon`` code fence.
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
  r"""`text` with each block of ``>>>`` lines (and the output after them) fenced as ``pycon``.

  >>> fence_doctests("Adds one.\n\n>>> 1 + 1\n2\n\nMore.").splitlines()
  ['Adds one.', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
  """
  out: list[str] = []
  in_block = False
  indent = ""
  for line in text.split("\n"):
    stripped = line.lstrip()
    if not in_block and stripped.startswith(">>>"):
      indent = line[: len(line) - len(stripped)]
      out.append(f"{indent}```pycon")
      in_block = True
    elif in_block and (not stripped or not line.startswith(indent)):
      out.append(f"{indent}```")
      in_block = False
    out.append(line)
  if in_block:
    out.append(f"{indent}```")
  return "\n".join(out)


class DoctestFences(griffe.Extension):
  """Fences the doctest examples of every docstring griffe loads."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    del kwargs
    if obj.docstring is not None and ">>>" in obj.docstring.value:
      obj.docstring.value = fence_doctests(obj.docstring.value)
