"""Short type aliases used across kckpt (in the style of optax)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeAlias

from etils import epath

PyTree: TypeAlias = Any
Step: TypeAlias = int
# A nested mapping of numbers: Python, NumPy or JAX scalars.
Metrics: TypeAlias = Mapping[str, Any]
PathLike: TypeAlias = str | os.PathLike | epath.Path
