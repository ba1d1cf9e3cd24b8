"""Short type aliases used across kckpt (in the style of optax)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

PyTree: TypeAlias = Any
Step: TypeAlias = int
# A nested mapping of numbers: Python, NumPy or JAX scalars.
Metrics: TypeAlias = Mapping[str, Any]
# How a step is named: a number, -1 / "latest" (the newest), "best", or a tag given to `save`.
StepSpec: TypeAlias = int | str
PathLike: TypeAlias = str | os.PathLike  # `etils.epath.Path` is an os.PathLike

if TYPE_CHECKING:
  from etils.epath import Path as EPath
else:
  # At run time (what `typing.get_type_hints` sees) the annotation names the protocol every kckpt path
  # follows: importing `etils.epath` costs 50 ms, which the listing commands never pay.
  EPath = os.PathLike
