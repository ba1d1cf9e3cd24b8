"""Short type aliases used across kckpt (in the style of optax)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeAlias

PyTree: TypeAlias = Any
Step: TypeAlias = int
# A nested mapping of numbers: Python, NumPy or JAX scalars.
Metrics: TypeAlias = Mapping[str, Any]
# How a step is named: a number, -1 / "latest" (the newest), "best", or a tag given to `save`.
StepSpec: TypeAlias = int | str
PathLike: TypeAlias = str | os.PathLike  # `etils.epath.Path` is an os.PathLike
