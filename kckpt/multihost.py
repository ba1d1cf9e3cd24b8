"""Process coordination: decisions taken once and shared by every process.

A decision that could differ between hosts (a clock-based save, a preemption
signal) is taken on the primary process and broadcast, so all processes save
the same steps. In a single-process run these are plain function calls.
"""

from __future__ import annotations

import jax
import numpy as np


def process_count() -> int:
  return jax.process_count()


def is_primary() -> bool:
  return jax.process_index() == 0


def agree(flag: bool) -> bool:
  """The primary process's `flag`, on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  value = multihost_utils.broadcast_one_to_all(np.asarray(bool(flag), dtype=np.int32))
  return bool(np.asarray(value))
