"""Every Orbax/JAX private name kckpt reaches still exists in the installed versions (see kckpt/_orbax/_reaches.py)."""

import asyncio
import dataclasses
import gc
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src import asyncio_utils

import kckpt
from kckpt._orbax import _drain, _kvstore_specs, _metadata, _reaches


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


def _same_metadata(fast, orbax, path="tree"):
  """Field by field, types included (Orbax's own `__eq__` on metadata ignores names, folders and storage)."""
  assert type(fast) is type(orbax), (path, type(fast), type(orbax))
  if isinstance(orbax, dict):
    assert list(fast) == list(orbax), path
    for key in orbax:
      _same_metadata(fast[key], orbax[key], f"{path}.{key}")
  elif isinstance(orbax, (list, tuple)):
    assert len(fast) == len(orbax), path
    for i, (a, b) in enumerate(zip(fast, orbax, strict=True)):
      _same_metadata(a, b, f"{path}[{i}]")
  elif dataclasses.is_dataclass(orbax):
    for field in dataclasses.fields(orbax):
      a, b = getattr(fast, field.name), getattr(orbax, field.name)
      if field.name == "storage" and b is not None:  # its Zarr metadata is left out of its `__eq__`
        assert (a.chunk_shape, a.write_shape, a.zarr_metadata) == (b.chunk_shape, b.write_shape, b.zarr_metadata), path
      else:
        assert a == b and str(a) == str(b), (path, field.name, a, b)
  else:
    assert fast == orbax, (path, fast, orbax)


@pytest.mark.parametrize(
  "storage",
  [
    kckpt.StorageOptions(),
    kckpt.StorageOptions(use_zarr3=True),
    kckpt.StorageOptions(use_ocdbt=False),
    kckpt.StorageOptions(compression=True, checksums=False),
  ],
  ids=["ocdbt-zarr2", "zarr3", "plain-zarr2", "compressed"],
)
def test_the_metadata_tree_read_from_the_small_files_is_the_one_orbax_builds(tmp_path, storage):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  state = {
    "w": jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding),
    "b": jnp.ones((8,), jnp.bfloat16),
    "host": np.arange(6, dtype=np.int16).reshape(2, 3),
    "step": 7,
    "lr": 0.5,
    "name": "run-1",
    "empty": {},
    "nothing": None,
    "layers": [jnp.zeros(3), (np.float32(2.0), jnp.ones((2, 2), jnp.int32))],
  }
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False, storage=storage) as ckpt:
    ckpt.save(state, step=1)
    item_dir = ckpt.step_details(1).path / "default"
  fast = _metadata._pytree_metadata_from_files(item_dir)  # pylint: disable=protected-access
  assert fast is not None, "the metadata tree fell back to Orbax's metadata(), which opens every array"
  _same_metadata(fast, ocp.PyTreeCheckpointHandler().metadata(item_dir).tree)
  assert fast["w"].sharding is not None and fast["w"].storage.chunk_shape == (2, 4)


def test_reading_a_steps_metadata_again_and_again_keeps_no_memory(tmp_path):
  # Orbax's metadata() kept about 5 KB per leaf for good on every call (TensorStore's `to_json`); a notebook
  # that polls `tree()` of a step of thousands of leaves grew by megabytes a call.
  state = {f"layer{i}": {"w": np.full((4, 4), i, np.float32), "b": np.zeros(4, np.float32)} for i in range(200)}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
    for _ in range(2):  # caches filled once
      ckpt.item_metadata(1), ckpt.tree(1)
    gc.collect()
    tracemalloc.start()
    try:
      before = tracemalloc.get_traced_memory()[0]
      for _ in range(10):
        ckpt.item_metadata(1), ckpt.tree(1)
      gc.collect()
      grown = tracemalloc.get_traced_memory()[0] - before
    finally:
      tracemalloc.stop()
  # Orbax's metadata() kept 39 MB here; what is left (tens of KB) is TensorStore contexts and NumPy's dtype names.
  assert grown < 400_000, f"10 reads of the metadata of 400 leaves kept {grown} bytes"


def test_checking_a_steps_data_files_again_and_again_keeps_no_memory(tmp_path):
  # The check that runs before every donated restore (the default) walked the OCDBT index with TensorStore's
  # dump, which kept about 1 KB per key for good on every call (its dicts' keys and values leak).
  from etils import epath  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _files  # pylint: disable=import-outside-toplevel

  state = {f"layer{i}": {"w": np.full((64, 4), i, np.float32), "b": np.zeros(300, np.float32)} for i in range(200)}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
  item = epath.Path(tmp_path / "checkpoints" / "ckpt_1" / "default")
  assert _files.damaged_files(item) == []
  gc.collect()
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(10):
      assert _files.damaged_files(item) == []
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()
  # TensorStore's dump kept about 7 MB here.
  assert grown < 200_000, f"10 checks of the data files of 400 leaves kept {grown} bytes"


def _spinning_reader(ended: list[str]):
  """A task that yields until its call is abandoned (then records it), or gives up after many turns."""

  async def reader() -> None:
    for _ in range(100_000):
      if _drain.abandoned():
        ended.append("refused")
        return
      await asyncio.sleep(0)  # a turn of the loop (not a wait for time)
    ended.append("never refused")

  return reader()


def test_a_failed_orbax_call_in_a_drained_read_waits_out_its_tasks_and_marks_them_abandoned():
  ended: list[str] = []

  async def call() -> None:
    async def fail() -> None:
      await asyncio.sleep(0)
      raise ValueError("the first error")

    await asyncio.gather(fail(), *[_spinning_reader(ended) for _ in range(5)])

  with _drain.drained(), pytest.raises(ValueError, match="the first error"):
    asyncio_utils.run_sync(call())
  # Each ended, seeing the call abandoned, before the error was raised (Orbax's own runner closes the loop
  # at the first error and leaves them pending: tests/test_integrity.py shows what that does to reads).
  assert ended == ["refused"] * 5


def test_a_keyboard_interrupt_in_a_drained_read_is_raised_at_once():
  ended: list[str] = []

  async def call() -> None:
    async def interrupted() -> None:
      await asyncio.sleep(0)
      raise KeyboardInterrupt

    await asyncio.gather(interrupted(), _spinning_reader(ended))

  with _drain.drained(), pytest.raises(KeyboardInterrupt):
    asyncio_utils.run_sync(call())
  assert ended == []  # not waited for


def test_each_arrays_kvstore_spec_is_orbaxs_without_its_leak():
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=import-outside-toplevel

  write = ts_utils.OcdbtKvStoreWriteOptions(mode=list(ts_utils.OcdbtWriteMode)[0], target_data_file_size=1 << 20)
  cases = [
    ("/tmp/run/ckpt_1/default", "params.w", None, None),
    ("/tmp/run/ckpt_1/default", None, None, None),
    ("/tmp/run/ckpt_1/default", "opt.mu", ts_utils.OcdbtProcessSpec(process_id="process3"), write),
    ("gs://bucket/run/ckpt_2/default", "params.w", None, write),
  ]
  _kvstore_specs.install()
  for directory, name, process_spec, write_options in cases:
    kwargs = {"process_spec": process_spec, "write_options": write_options}
    for _ in range(2):  # built, then from the cache
      spec = ts_utils._build_ocdbt_kvstore_tspec(directory, name, **kwargs)  # pylint: disable=protected-access
      assert spec == _kvstore_specs._original(directory, name, **kwargs)  # pylint: disable=protected-access
      spec["path"] = "changed by a caller"  # a copy: the next array's spec is not touched
  # Orbax's builder kept about 0.3 KB per array for good (TensorStore's `to_json`); one folder's worth now.
  gc.collect()
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
      ts_utils.build_kvstore_tspec("/tmp/run/ckpt_3/default", name=f"layer{i}.w")
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()
  assert grown < 50_000, f"2000 array specs kept {grown} bytes"
