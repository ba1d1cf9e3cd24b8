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


def test_a_restore_reports_its_progress_shard_by_shard(tmp_path):
  """Orbax reads the tree in one call; the bytes of each shard reach the restore's progress as it is read."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from kckpt import _orbax
  from kckpt._orbax import _read_progress

  state = {f"w{i}": jnp.full((32, 32), float(i)) for i in range(5)} | {"n": jnp.asarray(3)}
  with kckpt.Checkpointer(workdir=tmp_path / "run", save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
  item = tmp_path / "run" / "checkpoints" / "ckpt_1" / "default"
  calls = []
  restored = _orbax.read_tree_into(
    item, jax.tree.map(jnp.zeros_like, state), donate=False, on_batch=lambda b, n: calls.append((b, n))
  )
  for name, leaf in restored.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(state[name]))
  assert calls.count((4096, 0)) == 5 and calls[-1][1] == len(state)  # one call per 4 KiB array, then the leaves
  assert sum(b for b, _ in calls) == sum(x.nbytes for x in state.values())
  assert _read_progress.installed() and not _read_progress._listeners  # pylint: disable=protected-access
  # Plain Orbax in the same process reads as before and reports nowhere.
  plain = ocp.PyTreeCheckpointer().restore(item)
  assert isinstance(plain["w1"], jax.Array)
  np.testing.assert_array_equal(np.asarray(plain["w1"]), np.asarray(state["w1"]))
