"""Every Orbax/JAX private name kckpt reaches still exists in the installed versions (see kckpt/_orbax/_reaches.py)."""

import subprocess
import sys

import numpy as np

import kckpt
from kckpt._orbax import _metadata, _reaches


def test_every_private_reach_still_exists():
  broken = _reaches.check_all()
  assert not broken, "Orbax/JAX private names kckpt relies on changed; update kckpt/_orbax:\n  " + "\n  ".join(broken)


def test_the_item_metadata_layout_is_the_one_the_fast_reader_knows(tmp_path):
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"w": np.ones((2, 3), np.float32), "n": 3}, step=1)
  specs = _metadata._leaf_specs_from_zarr_metadata(tmp_path / "checkpoints" / "ckpt_1" / "default")  # pylint: disable=protected-access
  assert specs is not None, "Orbax's _METADATA layout changed: the fast leaf-spec reader falls back on every restore"
  assert specs["w"].shape == (2, 3) and specs["w"].dtype == np.float32


def test_import_kckpt_changes_nothing_in_orbax_or_logging():
  code = (
    "import logging\n"
    "from orbax.checkpoint._src.serialization import tensorstore_utils as t\n"
    "from orbax.checkpoint._src.path import gcs_utils as g\n"
    "before = (t._normalize_path, t._use_gcs_driver, g.get_kvstore_for_gcs, list(logging.getLogger('absl').filters))\n"
    "import kckpt, kckpt.checkpointer, kckpt.cli, kckpt._orbax\n"
    "after = (t._normalize_path, t._use_gcs_driver, g.get_kvstore_for_gcs, list(logging.getLogger('absl').filters))\n"
    "assert before == after, (before, after)\n"
    "print('unchanged')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0 and "unchanged" in out.stdout, out.stderr[-2000:]


def test_damaged_files_follows_every_level_of_a_deep_ocdbt_tree(tmp_path):
  """A database whose B-tree has interior nodes (small nodes): a short data file under any leaf is found."""
  import os  # pylint: disable=import-outside-toplevel

  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _files  # pylint: disable=import-outside-toplevel

  item = tmp_path / "item"
  kvstore = ts.KvStore.open(
    {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item}/"}, "config": {"max_decoded_node_bytes": 2000}}
  ).result()
  for i in range(400):
    kvstore.write(f"leaf{i:03d}/0", b"x" * 2000).result()
  (item / "_METADATA").write_text('{"use_ocdbt": true, "use_zarr3": false, "tree_metadata": {}}')
  assert _files.damaged_files(epath.Path(item)) == []
  data = sorted((item / "d").iterdir(), key=lambda p: p.stat().st_size)[-1]  # the biggest data file
  os.truncate(data, 10)
  problems = _files.damaged_files(epath.Path(item))
  assert problems and all("10 bytes, its metadata says at least" in p or "unreadable" in p for p in problems)
  assert any("unreadable leaves ['leaf" in p for p in problems), problems  # found through the interior nodes


def test_a_restore_adopts_its_read_buffers_on_the_cpu_without_copying(tmp_path, monkeypatch):
  """Each restored shard is read into a 64-byte-aligned buffer that the CPU client keeps as the array's memory."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from kckpt._orbax import _aligned

  buffers = []
  real = _aligned.aligned_empty

  def recording(shape, dtype, alignment=_aligned.ALIGNMENT):
    out = real(shape, dtype, alignment)
    buffers.append(out.ctypes.data)
    return out

  monkeypatch.setattr(_aligned, "aligned_empty", recording)
  state = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.arange(7, dtype=jnp.bfloat16), "n": jnp.asarray(3)}
  with kckpt.Checkpointer(workdir=tmp_path / "run", save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
    restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  for name, leaf in restored.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(state[name]))
    assert leaf.unsafe_buffer_pointer() in buffers, f"{name} was copied after the read"
  assert _aligned.installed()
  # Plain Orbax outside a kckpt restore reads as Orbax does (its own zeros), with the same values.
  count = len(buffers)
  plain = ocp.PyTreeCheckpointer().restore(tmp_path / "run" / "checkpoints" / "ckpt_1" / "default")
  np.testing.assert_array_equal(np.asarray(plain["w"]), np.asarray(state["w"]))
  assert len(buffers) == count


def test_aligned_empty_handles_empty_and_scalar_shapes():
  from kckpt._orbax import _aligned

  assert _aligned.aligned_empty((0,), np.float32).shape == (0,)
  scalar = _aligned.aligned_empty((), np.int32)
  assert scalar.shape == () and scalar.ctypes.data % _aligned.ALIGNMENT == 0
