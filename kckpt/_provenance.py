"""Provenance: what made a step (library versions, processes, devices, host, code, config).

Recorded in the step at `save` (kckpt's entry of the step metadata) and read
back by `Checkpointer.step_details(step).provenance`, ``kckpt ls --details``
and ``kckpt diff``. What does not change within a process is gathered once
(the git query runs at the first save); per save only the shardings of the
saved arrays are summarised.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import jax

from kckpt import items as items_lib


def _version(distribution: str) -> str | None:
  try:
    return importlib_metadata.version(distribution)
  except importlib_metadata.PackageNotFoundError:
    return None


def _script_dir() -> str | None:
  """The folder of the running script (``python train.py``, ``python -m pkg.train``), if any."""
  main = sys.modules.get("__main__")
  path = getattr(main, "__file__", None)
  return os.path.dirname(os.path.abspath(path)) if path else None


def git_state(folder: str | None) -> dict[str, Any] | None:
  """``{"commit", "dirty"}`` of the git work tree holding `folder`; None outside one (or without git).

  >>> git_state(None) is None
  True
  """
  if folder is None or not os.path.isdir(folder):
    return None

  def git(*args: str) -> str | None:
    try:
      done = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
      return None
    return done.stdout.strip() if done.returncode == 0 else None

  commit = git("rev-parse", "HEAD")
  if not commit:
    return None
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": bool(status) if status is not None else None}


@functools.cache
def process_provenance() -> dict[str, Any]:
  """What this process records in every step it saves (computed once)."""
  devices = jax.devices()
  kinds = collections.Counter(d.device_kind for d in devices)
  return {
    "kckpt": _version("kckpt"),
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "orbax": _version("orbax-checkpoint"),
    "tensorstore": _version("tensorstore"),
    "python": platform.python_version(),
    "process_count": jax.process_count(),
    "devices": {"platform": devices[0].platform, "kind": ", ".join(sorted(kinds)), "count": len(devices)},
    "host": socket.gethostname(),
    "git": git_state(_script_dir()),
  }


def _sharding_name(sharding: Any) -> str:
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if spec is not None and mesh is not None:
    axes = dict(getattr(mesh, "shape", {}))
    return f"{type(sharding).__name__}(mesh={axes}, spec={tuple(spec)})"
  return type(sharding).__name__


def shardings(trees: Iterable[Any]) -> dict[str, int]:
  """How many saved `jax.Array` leaves have each sharding (host values are not counted)."""
  counts: collections.Counter[Any] = collections.Counter()
  for tree in trees:
    for leaf in jax.tree.leaves(tree):
      if isinstance(leaf, jax.Array):
        counts[leaf.sharding] += 1
  named: collections.Counter[str] = collections.Counter()
  for sharding, n in counts.items():
    named[_sharding_name(sharding)] += n
  return dict(named)


def step_provenance(trees: Iterable[Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The provenance of one save: the process's, the arrays' shardings and the user's `config`.

  Raises ValueError when `config` is not JSON.
  """
  record = dict(process_provenance())
  record["shardings"] = shardings(trees)
  if config is not None:
    items_lib.check_json(config, name="config")
    record["config"] = json.loads(json.dumps(config))
  return record
