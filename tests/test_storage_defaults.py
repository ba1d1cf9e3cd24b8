"""kckpt's storage defaults (uncompressed, OCDBT, Zarr v2), their compatibility with plain Orbax, and save/restore telemetry.

Real Orbax and real files. No timing is asserted: speed lives in benchmarks/run.py.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import kckpt
from kckpt import _orbax
from kckpt import items
from kckpt import trees

ORBAX_FORMAT = kckpt.StorageOptions.orbax_defaults()
STORAGES = {
  "kckpt_defaults": kckpt.StorageOptions(),
  "orbax_defaults": ORBAX_FORMAT,
  "zarr2_without_checksums": kckpt.StorageOptions(use_zarr3=False, checksums=False),
  "no_ocdbt": kckpt.StorageOptions(use_ocdbt=False),
  "zarr3": kckpt.StorageOptions(use_zarr3=True),
}

# Every dtype the benchmark uses (float32, bfloat16), and those of a training state.
DTYPES = [np.float32, jnp.bfloat16, np.float16, np.int32, np.int8, np.uint8, np.uint32, np.bool_]
NUMPY_ONLY_DTYPES = [np.float64, np.int64]  # JAX without x64 has no such arrays


def state_of_every_dtype():
  rng = np.random.default_rng(0)
  state = {}
  for dtype in DTYPES + NUMPY_ONLY_DTYPES:
    name = np.dtype(dtype).name
    if np.dtype(dtype) == np.bool_:
      values = rng.random((3, 5)) > 0.5
    elif np.issubdtype(np.dtype(dtype), np.integer):
      values = rng.integers(0, 100, size=(3, 5))
    else:
      values = rng.standard_normal((3, 5))
    if dtype in DTYPES:
      state[f"jax_{name}"] = jnp.asarray(values, dtype=dtype)
    state[f"np_{name}"] = np.asarray(values).astype(dtype)
  state["rng"] = jax.random.key(7)
  state["step"] = jnp.asarray(11, jnp.int32)
  state["python_float"] = 0.5
  return state


def zeros_like(state):
  def zero(leaf):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    if isinstance(leaf, jax.Array):
      return jnp.zeros_like(leaf)
    if isinstance(leaf, np.ndarray):
      return np.zeros_like(leaf)
    return type(leaf)(0)

  return jax.tree.map(zero, state)


def assert_same_tree(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    if isinstance(e, jax.Array) and jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def zarr_metadata(item_dir):
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree
  return {k: m.storage.zarr_metadata for k, m in tree.items() if getattr(m, "storage", None) is not None}


def orbax_manager(directory, **options):
  """A plain Orbax manager on Kauldron's layout (step folders `ckpt_<step>`)."""
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt", create=True, enable_async_checkpointing=False, **options)
  return ocp.CheckpointManager(directory, options=options)


# -- The defaults ---------------------------------------------------------------


def test_defaults_are_uncompressed_ocdbt_zarr2_with_checksums(tmp_path):
  ckpt = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False)
  assert ckpt.storage == kckpt.StorageOptions(compression=False, use_ocdbt=True, use_zarr3=False, checksums=True)
  ckpt.save({"w": jnp.ones((4, 8)), "n": np.arange(3)}, step=1)
  item_dir = tmp_path / "checkpoints" / "ckpt_1" / "default"
  assert (item_dir / "manifest.ocdbt").exists()
  meta = zarr_metadata(item_dir)
  assert {m.zarr_format for m in meta.values()} == {2}
  assert all(m.compression is None for m in meta.values())
  assert (item_dir.parent / "_KCKPT_CHECKSUMS.json").exists()


@pytest.mark.parametrize("name", STORAGES)
def test_each_storage_option_is_written_as_asked(tmp_path, name):
  storage = STORAGES[name]
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False, storage=storage) as ckpt:
    ckpt.save({"w": jnp.ones((4, 8))}, step=1)
  item_dir = tmp_path / "checkpoints" / "ckpt_1" / "default"
  assert (item_dir / "manifest.ocdbt").exists() == storage.use_ocdbt
  (meta,) = zarr_metadata(item_dir).values()
  assert meta.zarr_format == (3 if storage.use_zarr3 else 2)
  assert (meta.compression is not None) == storage.compression
  if storage.compression:
    assert meta.compression.algorithm == "zstd"


@pytest.mark.parametrize("name", STORAGES)
def test_round_trip_of_every_dtype(tmp_path, name):
  state = state_of_every_dtype()
  ckpt = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, storage=STORAGES[name])
  ckpt.save(state, step=1)
  ckpt.wait_until_finished()
  assert_same_tree(ckpt.restore(zeros_like(state)), state)
  as_saved = ckpt.restore()  # no target: NumPy arrays, PRNG keys as their key data
  np.testing.assert_array_equal(as_saved["jax_bfloat16"], np.asarray(state["jax_bfloat16"]))
  assert as_saved["jax_bfloat16"].dtype == jnp.bfloat16
  ckpt.close()


def test_items_and_json_use_the_storage_options(tmp_path):
  storage = kckpt.StorageOptions(use_zarr3=True)
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False, storage=storage) as ckpt:
    ckpt.save(items.Composite(params={"w": jnp.ones(3)}, opt={"mu": jnp.zeros(3)}, meta=items.Json({"epoch": 1})), step=1)
    restored = ckpt.restore(items.Composite(params={"w": jnp.zeros(3)}, meta=None))
  assert restored.meta == {"epoch": 1}
  np.testing.assert_array_equal(restored.params["w"], np.ones(3))
  for name in ("params", "opt"):
    (meta,) = zarr_metadata(tmp_path / "checkpoints" / "ckpt_1" / name).values()
    assert meta.zarr_format == 3


def test_concurrency_limits_round_trip(tmp_path):
  # Orbax needs room for the largest array: 300 kB at a time, arrays of 256 kB.
  storage = kckpt.StorageOptions(save_concurrent_gb=0.0003, restore_concurrent_gb=0.0003)
  state = {f"w{i}": jnp.full((64, 1024), float(i)) for i in range(4)}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, storage=storage) as ckpt:
    ckpt.save(state, step=1)
    assert_same_tree(ckpt.restore(zeros_like(state)), state)


# -- Compatibility with plain Orbax ------------------------------------------------


@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
@pytest.mark.parametrize("name", STORAGES)
def test_plain_orbax_reads_kckpt_files(tmp_path, name):
  state = {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}, "step": jnp.asarray(5)}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, storage=STORAGES[name]) as ckpt:
    ckpt.save(state, step=2)
  with orbax_manager(tmp_path / "checkpoints") as manager:  # Orbax's defaults: zstd, OCDBT, zarr2
    restored = manager.restore(2, args=ocp.args.StandardRestore(zeros_like(state)))
  assert_same_tree(restored, state)
  with ocp.PyTreeCheckpointer() as checkpointer:  # the item folder alone, no target
    raw = checkpointer.restore(tmp_path / "checkpoints" / "ckpt_2" / "default")
  np.testing.assert_array_equal(np.asarray(raw["params"]["w"]), np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize(
  "handler_options",
  [{}, {"use_zarr3": True}, {"use_ocdbt": False}, {"use_compression": False}],
  ids=["orbax_defaults", "zarr3", "no_ocdbt", "uncompressed"],
)
def test_kckpt_reads_plain_orbax_files(tmp_path, handler_options):
  state = {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}, "n": np.arange(3, dtype=np.int16)}
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("default", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(**handler_options))
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt", create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "checkpoints", options=options, handler_registry=registry) as manager:
    manager.save(4, args=ocp.args.Composite(default=ocp.args.PyTreeSave(state)))
  ckpt = kckpt.Checkpointer.open(tmp_path)
  assert_same_tree(ckpt.restore(zeros_like(state)), state)
  np.testing.assert_array_equal(ckpt.restore()["params"]["w"], np.arange(12.0).reshape(3, 4))
  shapes = ckpt.item_metadata()
  assert shapes["params"]["b"] == jax.ShapeDtypeStruct((4,), jnp.bfloat16)


def test_kckpt_reads_a_plain_orbax_standard_save(tmp_path):
  state = {"w": jnp.arange(6.0), "step": jnp.asarray(3)}
  with orbax_manager(tmp_path / "checkpoints") as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
  assert_same_tree(kckpt.Checkpointer.open(tmp_path).restore(zeros_like(state)), state)


# -- Reading leaf shapes and dtypes ----------------------------------------------


@pytest.mark.parametrize("name", STORAGES)
def test_fast_leaf_specs_agree_with_orbax_metadata(tmp_path, name):
  import optax  # pylint: disable=g-import-not-at-top

  params = {"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}}
  state = {
    **state_of_every_dtype(),
    "params": params,
    "opt": optax.chain(optax.clip(1.0), optax.adam(1e-3)).init(params),
    "nested": [jnp.ones(2), (np.int32(4), np.zeros(()))],
    "text": "hello",
    "empty": {},
    "nothing": None,
  }
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False, storage=STORAGES[name]) as ckpt:
    ckpt.save(state, step=1)
  item_dir = epath.Path(tmp_path) / "checkpoints" / "ckpt_1" / "default"
  fast = _orbax._metadata._leaf_specs_from_zarr_metadata(item_dir)  # pylint: disable=protected-access
  assert fast is not None
  assert fast == _orbax._metadata._leaf_specs_from_orbax_metadata(item_dir)  # pylint: disable=protected-access
  assert fast["jax_bfloat16"] == trees.LeafSpec((3, 5), np.dtype(jnp.bfloat16))
  assert fast["rng"] == trees.LeafSpec((2,), np.dtype(np.uint32))
  assert fast["python_float"] == trees.LeafSpec((), None)


def test_fast_leaf_specs_step_aside_when_unsure(tmp_path):
  item_dir = epath.Path(tmp_path) / "item"
  item_dir.mkdir()
  assert _orbax._metadata._leaf_specs_from_zarr_metadata(item_dir) is None  # pylint: disable=protected-access
  (item_dir / "_METADATA").write_text('{"tree_metadata": {}, "use_ocdbt": "maybe"}')
  assert _orbax._metadata._leaf_specs_from_zarr_metadata(item_dir) is None  # pylint: disable=protected-access


def test_mismatch_is_still_reported_by_path(tmp_path):
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}, step=1)
    with pytest.raises(kckpt.TreeMismatchError, match=r"w: saved \(4, 4\) float32, target \(3, 4\) float32"):
      ckpt.restore({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})


# -- Options -----------------------------------------------------------------------


def test_storage_options_are_validated_hashable_and_configurable():
  with pytest.raises(ValueError, match="compression must be a bool"):
    kckpt.StorageOptions(compression="yes")
  with pytest.raises(ValueError, match="save_concurrent_gb"):
    kckpt.StorageOptions(save_concurrent_gb=0)
  with pytest.raises(ValueError, match="Checkpointer.storage"):
    kckpt.Checkpointer(save_interval_steps=1, storage={"compression": True})
  ckpt = kckpt.Checkpointer.from_config({"save_interval_steps": 1, "storage": {"compression": True, "use_zarr3": True}})
  assert ckpt.storage == kckpt.StorageOptions(compression=True, use_zarr3=True)
  assert hash(ckpt) == hash(dataclasses.replace(ckpt))
  assert ckpt != ckpt.replace(storage=kckpt.StorageOptions())
  assert ORBAX_FORMAT == kckpt.StorageOptions(compression=True, use_ocdbt=True, use_zarr3=False, checksums=False)


# -- Telemetry -------------------------------------------------------------------


def nbytes(state):
  """Bytes of every leaf as NumPy holds it (a PRNG key as its key data)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += np.asarray(leaf).nbytes
  return total


def test_sync_save_and_restore_stats(tmp_path, caplog):
  state = state_of_every_dtype()
  ckpt = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False)
  assert ckpt.last_save_stats is None and ckpt.last_restore_stats is None
  with caplog.at_level(logging.INFO, logger="kckpt"):
    ckpt.save(state, step=3)
    stats = ckpt.last_save_stats
    assert stats.operation == "save" and stats.step == 3 and not stats.async_save
    assert stats.bytes == nbytes(state)
    assert stats.done and stats.seconds > 0 and stats.blocked_seconds >= stats.seconds
    assert stats.mb_per_s == pytest.approx(stats.bytes / stats.seconds / 1e6)
    ckpt.restore(zeros_like(state))
  restored = ckpt.last_restore_stats
  assert restored.operation == "restore" and restored.step == 3
  assert restored.bytes == stats.bytes
  assert restored.seconds > 0 and restored.blocked_seconds == restored.seconds
  messages = [r.getMessage() for r in caplog.records if r.name == "kckpt"]
  assert any(m.startswith("kckpt saved step 3:") and "MB/s" in m and "blocked" in m for m in messages)
  assert any(m.startswith("kckpt restored step 3:") for m in messages)
  ckpt.close()


def test_async_save_stats_are_completed_when_durable(tmp_path, caplog):
  state = {"w": jnp.ones((256, 256)), "b": np.zeros(10, np.float32)}
  ckpt = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=True)
  with caplog.at_level(logging.INFO, logger="kckpt"):
    ckpt.save(state, step=1)
    pending = ckpt.last_save_stats
    assert pending.async_save and pending.bytes == 256 * 256 * 4 + 40 and pending.blocked_seconds > 0
    ckpt.wait_until_finished()
  stats = ckpt.last_save_stats
  assert stats.done and stats.seconds >= stats.blocked_seconds > 0 and stats.mb_per_s > 0
  assert stats.blocked_seconds == pending.blocked_seconds
  assert any(r.getMessage().startswith("kckpt saved step 1:") for r in caplog.records if r.name == "kckpt")
  ckpt.save(state, step=2)  # the next save waits for nothing left over
  ckpt.close()
  assert ckpt.last_save_stats.step == 2 and ckpt.last_save_stats.done


def test_stats_count_pytree_items_only(tmp_path):
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(items.Composite(params={"w": np.ones(8, np.float32)}, meta=items.Json({"epoch": 3, "name": "x" * 100})), step=1)
    assert ckpt.last_save_stats.bytes == 32
    ckpt.restore(items.Composite(params={"w": np.zeros(8, np.float32)}, meta=None))
    assert ckpt.last_restore_stats.bytes == 32


def test_transfer_stats_while_pending_and_done():
  stats = kckpt.TransferStats(operation="save", step=1, bytes=10**6, blocked_seconds=0.01, seconds=None, async_save=True)
  assert not stats.done and stats.mb_per_s is None
  assert "being written in the background" in stats.describe()
  done = dataclasses.replace(stats, seconds=0.5)
  assert done.mb_per_s == pytest.approx(2.0)
  assert "(2 MB/s)" in done.describe()
