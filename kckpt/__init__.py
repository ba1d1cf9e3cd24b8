"""kckpt: a checkpoint manager for JAX/Flax training, built on Orbax.

>>> import kckpt
>>> ckpt = kckpt.Checkpointer(workdir=None, save_interval_steps=1000)
>>> ckpt.max_to_keep
3

Public names are resolved on first use (PEP 562), so ``import kckpt`` is
cheap and imports neither JAX nor Orbax until a name needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
  "BaseCheckpointer": "kckpt.base",
  "Checkpointer": "kckpt.checkpointer",
  "NoopCheckpointer": "kckpt.base",
  "PartialLoader": "kckpt.partial_loader",
  "StorageOptions": "kckpt.storage",
  "TransferStats": "kckpt.telemetry",
  "clear_end_marker": "kckpt.markers",
  "trainer_finished": "kckpt.markers",
  "write_end_marker": "kckpt.markers",
  "BackgroundSaveError": "kckpt.errors",
  "CheckpointNotFoundError": "kckpt.errors",
  "CheckpointReadError": "kckpt.errors",
  "ConcurrentWriterError": "kckpt.errors",
  "ProcessTimeoutError": "kckpt.errors",
  "ReadOnlyCheckpointerError": "kckpt.errors",
  "StepAlreadyExistsError": "kckpt.errors",
  "TransplantError": "kckpt.errors",
  "TreeMismatchError": "kckpt.errors",
}
_SUBMODULES = (
  "base",
  "checkpointer",
  "cloud",
  "errors",
  "inspect",
  "items",
  "markers",
  "partial_loader",
  "policies",
  "storage",
  "telemetry",
  "trees",
)

__all__ = sorted([*_PUBLIC, *_SUBMODULES])


def __getattr__(name: str) -> Any:
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"kckpt.{name}")
  else:
    raise AttributeError(f"module 'kckpt' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *__all__])


if TYPE_CHECKING:
  from kckpt import base
  from kckpt import checkpointer
  from kckpt import cloud
  from kckpt import errors
  from kckpt import inspect
  from kckpt import items
  from kckpt import markers
  from kckpt import partial_loader
  from kckpt import policies
  from kckpt import storage
  from kckpt import telemetry
  from kckpt import trees
  from kckpt.base import BaseCheckpointer, NoopCheckpointer
  from kckpt.checkpointer import Checkpointer
  from kckpt.errors import (
    BackgroundSaveError,
    CheckpointNotFoundError,
    CheckpointReadError,
    ConcurrentWriterError,
    ProcessTimeoutError,
    ReadOnlyCheckpointerError,
    StepAlreadyExistsError,
    TransplantError,
    TreeMismatchError,
  )
  from kckpt.markers import clear_end_marker, trainer_finished, write_end_marker
  from kckpt.partial_loader import PartialLoader
  from kckpt.storage import StorageOptions
  from kckpt.telemetry import TransferStats
