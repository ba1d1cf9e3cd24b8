"""Round trips of every kind of item through real Orbax checkpoints."""

import collections
import dataclasses
import shutil
import typing

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kckpt
from kckpt import items


def roundtrip(workdir, state, target=None, **restore_kwargs):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(state, step=1)
  ckpt.wait_until_finished()
  return ckpt.restore(state if target is None else target, **restore_kwargs)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))


@flax.struct.dataclass
class TrainState(items.StandardCheckpointItem):
  step: int
  params: dict
  opt_state: typing.Any
  rng: jax.Array


def make_train_state(seed=0):
  params = {"w": jax.random.normal(jax.random.key(seed), (3, 2)), "b": jnp.zeros(2)}
  return TrainState(step=seed, params=params, opt_state=optax.adam(1e-3).init(params), rng=jax.random.key(seed))


def test_flax_struct_dataclass_with_optax_and_typed_key(workdir):
  saved = make_train_state(seed=1)
  restored = roundtrip(workdir, saved, target=make_train_state(seed=2), donate=False)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert_trees_equal(restored, saved)


def test_bare_standard_item_restores_whatever_was_saved(workdir):
  roundtrip(workdir, make_train_state(seed=3))
  out = kckpt.Checkpointer.open(workdir).restore(items.StandardCheckpointItem())
  assert isinstance(out["params"]["w"], np.ndarray) and out["params"]["w"].shape == (3, 2)


def test_nnx_state(workdir):
  class Model(nnx.Module):
    def __init__(self, seed):
      self.linear = nnx.Linear(3, 4, rngs=nnx.Rngs(seed))

  saved = nnx.state(Model(0))
  restored = roundtrip(workdir, saved, target=nnx.state(Model(1)))
  assert isinstance(restored, nnx.State)
  np.testing.assert_array_equal(restored["linear"]["kernel"][...], saved["linear"]["kernel"][...])
  model = Model(5)
  nnx.update(model, restored)
  np.testing.assert_array_equal(model.linear.kernel[...], saved["linear"]["kernel"][...])


def test_numpy_and_python_scalars(workdir):
  saved = {"i": 7, "f": 2.5, "np_i": np.int32(4), "arr": np.arange(5, dtype=np.int16), "jax": jnp.ones(2, jnp.bfloat16)}
  restored = roundtrip(
    workdir,
    saved,
    target={"i": 0, "f": 0.0, "np_i": np.int32(0), "arr": np.zeros(5, np.int16), "jax": jnp.zeros(2, jnp.bfloat16)},
  )
  assert restored["i"] == 7 and isinstance(restored["i"], int)
  assert restored["f"] == 2.5
  assert int(restored["np_i"]) == 4
  np.testing.assert_array_equal(restored["arr"], np.arange(5))
  assert restored["arr"].dtype == np.int16 and isinstance(restored["arr"], np.ndarray)
  assert restored["jax"].dtype == jnp.bfloat16 and isinstance(restored["jax"], jax.Array)


def test_bare_array_as_whole_state(workdir):
  restored = roundtrip(workdir, jnp.arange(6.0), target=jnp.zeros(6))
  np.testing.assert_array_equal(restored, np.arange(6.0))


def test_json_item(workdir):
  meta = {"config": {"lr": 0.1, "layers": [1, 2]}, "name": "run", "ok": True, "none": None}
  out = roundtrip(workdir, items.Composite(meta=items.Json(meta)))
  assert out.meta == meta
  assert kckpt.Checkpointer.open(workdir).restore(items.Composite(meta=items.Json())).meta == meta


def test_composite_restores_only_requested_items(workdir):
  params = {"w": jnp.ones((2, 2))}
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(items.Composite(params=params, opt_state=opt_state, meta=items.Json({"epoch": 2})), step=1)
  ckpt.wait_until_finished()
  # Remove opt_state entirely: restoring params must not touch it.
  shutil.rmtree(workdir / "checkpoints" / "ckpt_1" / "opt_state")
  out = ckpt.restore(items.Composite(params={"w": jnp.zeros((2, 2))}))
  assert out.names == ("params",)
  np.testing.assert_array_equal(out.params["w"], np.ones((2, 2)))
  np.testing.assert_array_equal(out["params"]["w"], np.ones((2, 2)))
  with pytest.raises(ValueError, match=r"nope: no such item in step 1 \(it has: \['meta', 'opt_state', 'params'\]\)"):
    ckpt.restore(items.Composite(nope={"w": jnp.zeros(1)}))


def test_composite_mismatch_names_item_and_leaf(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(items.Composite(params={"w": jnp.ones((2, 2))}), step=1)
  with pytest.raises(ValueError, match=r"params/w: saved \(2, 2\) float32, target \(3, 2\) float32"):
    ckpt.restore(items.Composite(params={"w": jnp.zeros((3, 2))}))


def test_composite_is_a_read_only_mapping():
  c = items.Composite(a=1, b=items.Json(2))
  assert dict(c) == {"a": 1, "b": items.Json(2)} and len(c) == 2 and c == items.Composite(a=1, b=items.Json(2))
  with pytest.raises(AttributeError, match="no item 'z'"):
    _ = c.z
  with pytest.raises(AttributeError):
    c.a = 3
  for bad in ("metrics", "_private", "a/b", ""):
    with pytest.raises(ValueError, match="item name"):
      items.Composite(**{bad: 1})


class NamedState(items.TopLevelCheckpointItem, collections.namedtuple("NamedState", "state meta")):
  DEFAULT_ITEM = "state"


@dataclasses.dataclass
class DataclassState(items.TopLevelCheckpointItem):
  DEFAULT_ITEM: typing.ClassVar[str] = "state"
  state: typing.Any
  meta: typing.Any


@items.TopLevelCheckpointItem.register
class RegisteredState(typing.NamedTuple):
  state: typing.Any
  meta: typing.Any
  DEFAULT_ITEM = "state"


@pytest.mark.parametrize("cls", [NamedState, DataclassState, RegisteredState])
def test_top_level_item(workdir, cls):
  saved = cls(state=make_train_state(seed=4), meta=items.Json({"epoch": 9}))
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(saved, step=1)
  ckpt.wait_until_finished()
  assert sorted(p.name for p in (workdir / "checkpoints" / "ckpt_1").iterdir() if p.is_dir()) == ["default", "meta"]
  restored = ckpt.restore(cls(state=make_train_state(seed=0), meta=items.Json()))
  assert type(restored) is cls
  assert restored.meta == {"epoch": 9}
  assert_trees_equal(restored.state, saved.state)
  # The default item is what a plain restore (and Kauldron) finds.
  assert ckpt.restore()["params"]["w"].shape == (3, 2)


class Cursor(items.CheckpointItem):
  """A custom item: a data iterator position stored as JSON."""

  format = "json"

  def __init__(self, position=0):
    self.position = position

  def checkpoint_value(self):
    return {"position": self.position}

  def from_restored(self, value):
    return Cursor(value["position"])


class Scaled(items.CheckpointItem):
  """A custom pytree item that post-processes after restoring."""

  def __init__(self, w):
    self.w = w

  def checkpoint_value(self):
    return {"w": self.w}

  def from_restored(self, value):
    return Scaled(value["w"] * 2)


def test_custom_items(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(items.Composite(cursor=Cursor(41), scaled=Scaled(jnp.ones(3))), step=1)
  out = ckpt.restore(items.Composite(cursor=Cursor(), scaled=Scaled(jnp.zeros(3))))
  assert isinstance(out.cursor, Cursor) and out.cursor.position == 41
  np.testing.assert_array_equal(out.scaled.w, 2 * np.ones(3))
  solo = kckpt.Checkpointer(workdir=workdir.parent / "solo", save_interval_steps=1)
  solo.save(Cursor(3), step=2)
  assert solo.restore(Cursor()).position == 3


# -- DataIterator ---------------------------------------------------------------


def grain_dataset():
  import grain  # pylint: disable=import-outside-toplevel

  return grain.MapDataset.range(50).shuffle(seed=3).map(lambda x: 10 * x).to_iter_dataset()


def grain_loader():
  import grain  # pylint: disable=import-outside-toplevel

  sampler = grain.samplers.IndexSampler(num_records=40, shuffle=True, seed=1, num_epochs=1)
  return grain.DataLoader(data_source=grain.sources.RangeDataSource(0, 40, 1), sampler=sampler, worker_count=0)


@pytest.mark.parametrize("make", [grain_dataset, grain_loader], ids=["dataset_iterator", "data_loader"])
def test_data_iterator_resumes_a_grain_iterator_where_it_was_saved(workdir, make):
  data = iter(make())
  seen = [next(data) for _ in range(7)]
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1) as ckpt:
    ckpt.save(items.Composite(params={"w": jnp.ones(2)}, data=items.DataIterator(data)), step=7)
    expected = [next(data) for _ in range(5)]  # drawn while the save may still run: the saved state is step 7's
    ckpt.wait_until_finished()
    fresh = iter(make())
    restored = ckpt.restore(items.Composite(params={"w": jnp.zeros(2)}, data=items.DataIterator(fresh)))
  assert isinstance(restored.data, items.DataIterator) and restored.data.iterator is fresh
  assert [next(fresh) for _ in range(5)] == expected
  assert not set(expected) & set(seen)
  # As saved: one state per process, here one.
  raw = kckpt.Checkpointer.open(workdir).restore(items.Composite(data=None)).data
  assert raw["process_count"] == 1 and len(raw["states"]) == 1


def test_data_iterator_refuses_a_restart_with_another_process_count_and_a_state_that_is_not_json(workdir):
  data = iter(grain_dataset())
  next(data)
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(items.Composite(data=items.DataIterator(data), meta=items.Json({"a": 1})), step=1)
  saved = kckpt.Checkpointer.open(workdir).restore(items.Composite(data=None)).data
  as_if_two = {**saved, "process_count": 2, "states": saved["states"] * 2}
  with pytest.raises(ValueError, match="saved by 2 process\\(es\\), this run has 1"):
    items.DataIterator(iter(grain_dataset())).from_restored(as_if_two)
  with pytest.raises(ValueError, match="not a DataIterator's"):
    kckpt.Checkpointer.open(workdir).restore(items.Composite(meta=items.DataIterator(iter(grain_dataset()))))

  class Opaque:
    def get_state(self):
      return object()

  with pytest.raises(TypeError, match="get_state\\(\\) returned object, which is neither JSON nor bytes"):
    items.DataIterator(Opaque()).checkpoint_value()
