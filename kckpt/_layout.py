"""Folder naming of a run: ``<workdir>/checkpoints/ckpt_<step>/<item>/`` (Kauldron's layout).

kckpt's own small files beside the steps live here too (the writer's recorded
retention rules). What Orbax writes inside a step folder is `kckpt._orbax`'s
business.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kckpt import _fs
from kckpt import cloud
from kckpt._types import EPath, PathLike, Step

CHECKPOINTS_FOLDER = "checkpoints"
STEP_PREFIX = "ckpt"
DEFAULT_ITEM = "default"
# Sub-folders of a step that are bookkeeping (Orbax's metrics and descriptors), never user items.
RESERVED_ITEMS = frozenset({"metrics", "descriptor", "metadata_internal"})

_STEP_NAME = re.compile(rf"^{STEP_PREFIX}_(\d+)$")


def checkpoints_dir(workdir: PathLike) -> EPath:
  """The folder that holds the step folders of the run at `workdir` (made absolute)."""
  cloud.prepare(workdir)
  return _fs.as_path(_fs.absolute(workdir)) / CHECKPOINTS_FOLDER


def step_dir(checkpoints: EPath, step: Step) -> EPath:
  """The folder of `step` (whether or not it exists)."""
  return checkpoints / f"{STEP_PREFIX}_{step}"


def parse_step(name: str) -> Step | None:
  """``"ckpt_12"`` -> ``12``; anything else (temporary folders too) -> ``None``."""
  match = _STEP_NAME.match(name)
  return int(match.group(1)) if match else None


def is_step_like(name: str) -> bool:
  """Whether `name` starts like a step folder (``ckpt_...``, finished or not)."""
  return name.startswith(f"{STEP_PREFIX}_")


def steps_repr(steps: Sequence[Step], limit: int = 8) -> str:
  """``[0, 10, 20, ..., 990]``: a short form of a long list of steps."""
  if len(steps) <= limit:
    return str(list(steps))
  head = ", ".join(map(str, steps[: limit // 2]))
  tail = ", ".join(map(str, steps[-(limit // 2) :]))
  return f"[{head}, ... {len(steps) - limit} more ..., {tail}]"


RETENTION_FILE = "RETENTION.json"  # the writer's retention rules, for tools such as `kckpt gc`


def write_retention_rules(checkpoints: EPath, rules: Mapping[str, Any]) -> None:
  """Records the retention rules a writer applies (replacing those of an earlier writer)."""
  _fs.write_text_atomic(checkpoints / RETENTION_FILE, json.dumps(dict(rules), indent=1, sort_keys=True))


def read_retention_rules(checkpoints: EPath) -> dict[str, Any] | None:
  """The rules recorded by the run's writer, or None."""
  try:
    return json.loads((checkpoints / RETENTION_FILE).read_text())
  except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
    return None
