"""Renamed `kckpt.partial_loader` (``kckpt.PartialLoader`` is unchanged); this name still imports, with a warning."""

import warnings

from kckpt.errors import TransplantError
from kckpt.partial_loader import PartialLoader

warnings.warn(
  "kckpt.transplant is now kckpt.partial_loader (kckpt.PartialLoader and kckpt.TransplantError are unchanged)",
  DeprecationWarning,
  stacklevel=2,
)

__all__ = ["PartialLoader", "TransplantError"]
