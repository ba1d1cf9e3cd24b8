"""Shared fixtures. Tests run on the CPU with real Orbax and real files."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several CPU devices, so that restoring onto other shardings is tested in-process.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import pytest  # noqa: E402


@pytest.fixture
def workdir(tmp_path):
  """A fresh run folder (not created: kckpt creates it on the first save)."""
  return tmp_path / "run"


def snapshot(path):
  """Every file and folder under `path` with size and mtime: to prove nothing changed."""
  result = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.stat(full)
      result[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return result
