"""Small helpers shared by the tests."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def subprocess_env(**extra):
  """The environment for a Python subprocess that imports kckpt on the CPU."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["PYTHONUNBUFFERED"] = "1"
  env.update({k: str(v) for k, v in extra.items()})
  return env


PYTHON = sys.executable
