"""What the `kckpt` command prints: sizes, numbers, tables, JSON and the progress line."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from kckpt import _progress
from kckpt.inspect._common import human_bytes  # noqa: F401  (the command's tables use it as _format.human_bytes)


def format_number(value: Any) -> str:
  """A metric value in a table: floats with 4 significant digits."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def compact_json(value: Any, limit: int = 200) -> str:
  """`value` as one line of JSON, cut at `limit` characters.

  >>> compact_json({"lr": 0.1, "model": {"width": 512}})
  '{"lr": 0.1, "model": {"width": 512}}'
  """
  text = json.dumps(value, sort_keys=True, default=str)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def plural(n: int, word: str) -> str:
  """``plural(1, "step") == "1 step"``, ``plural(2, "step") == "2 steps"``."""
  return f"{n} {word}{'s' * (n != 1)}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()) -> str:
  """Columns padded to their widest cell; columns in `right` are right-aligned."""
  widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

  def line(cells: Sequence[str]) -> str:
    parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
    return "  ".join(parts).rstrip()

  return "\n".join([line(headers)] + [line(r) for r in rows])


def print_json(value: Any, out: TextIO | None = None, *, indent: int | None = 2) -> None:
  """Strict JSON (NaN and infinities become the strings "nan", "inf", "-inf"); `indent=None`: one line."""
  out = out if out is not None else sys.stdout
  json.dump(_jsonable(value), out, indent=indent, default=_json_default, allow_nan=False)
  out.write("\n")


def _jsonable(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _json_default(value: Any) -> Any:
  np = sys.modules.get("numpy")  # not imported by the listing commands: then no value is a NumPy one
  if np is not None and isinstance(value, np.generic):
    return value.item()
  if isinstance(value, os.PathLike):  # epath.Path is one
    return os.fspath(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_terminal(stream: Any) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


# The command's status line: kckpt's own progress display (a tqdm line on a terminal, nothing elsewhere).
Progress = _progress.StatusLine
