"""Tests of `kckpt.Checkpointer`: every field and method, on real Orbax and real files."""

import dataclasses
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt import items
from tests.conftest import snapshot
from tests.helpers import HtmlTable


def make_state(scale=1.0):
  return {
    "params": {"dense": {"w": jnp.full((4, 4), scale), "b": jnp.zeros(4)}},
    "step": jnp.asarray(3),
  }


def ckpt_for(workdir, **kwargs):
  kwargs.setdefault("save_interval_steps", 1)
  return kckpt.Checkpointer(workdir=workdir, **kwargs)


# -- Construction and configuration ------------------------------------------


def test_construction_does_no_io(tmp_path):
  workdir = tmp_path / "not" / "yet"
  ckpt = ckpt_for(workdir, create=True)
  assert ckpt.save_interval_steps == 1
  assert not (tmp_path / "not").exists()


def test_workdir_none_raises_clear_error_at_first_io():
  ckpt = kckpt.Checkpointer(save_interval_steps=10)
  for use in (
    lambda: ckpt.latest_step,
    lambda: ckpt.all_steps,
    lambda: ckpt.restore(),
    lambda: ckpt.save({"a": np.ones(1)}, step=1),
  ):
    with pytest.raises(ValueError, match="workdir is None.*replace"):
      use()


def test_workdir_bound_late_with_replace(workdir):
  config = kckpt.Checkpointer(save_interval_steps=5, max_to_keep=2)
  ckpt = dataclasses.replace(config, workdir=workdir)
  assert ckpt.save({"a": np.ones(2)}, step=5)
  ckpt.wait_until_finished()
  assert ckpt.latest_step == 5
  assert config.workdir is None and ckpt.max_to_keep == 2
  assert ckpt.replace(max_to_keep=7).max_to_keep == 7


def test_hashable_comparable_printable(tmp_path):
  a = kckpt.Checkpointer(workdir=str(tmp_path), save_interval_steps=10, save_on_steps=[3, 1])
  b = kckpt.Checkpointer(workdir=str(tmp_path), save_interval_steps=10, save_on_steps=(1, 3))
  assert a == b and hash(a) == hash(b)
  assert {a: 1}[b] == 1
  assert a != dataclasses.replace(a, max_to_keep=4)
  text = repr(a)
  assert text.startswith("Checkpointer(") and "save_interval_steps=10" in text and "save_on_steps=(1, 3)" in text
  # Orbax's options are not hashable; a Checkpointer holding them still is.
  c = kckpt.Checkpointer.from_config({"save_interval_steps": 1, "multiprocessing_options": {"primary_host": 0}})
  hash(c)


class FakeConfigDict:
  """Stands for ml_collections.ConfigDict: anything with `to_dict()`."""

  def __init__(self, **values):
    self._values = values

  def to_dict(self):
    return dict(self._values)


def test_from_config_plain_dict_and_configdict():
  ckpt = kckpt.Checkpointer.from_config(
    {
      "save_interval_steps": 100,
      "keep_time_interval": 3600,
      "max_to_keep": 2,
      "save_on_steps": [7],
      "best_metric_path": "eval.loss",
      "best_mode": "min",
    }
  )
  assert ckpt.keep_time_interval == datetime.timedelta(hours=1)
  assert ckpt.save_on_steps == (7,) and ckpt.best_mode == "min" and ckpt.workdir is None
  same = kckpt.Checkpointer.from_config(
    FakeConfigDict(
      save_interval_steps=100,
      keep_time_interval=3600,
      max_to_keep=2,
      save_on_steps=[7],
      best_metric_path="eval.loss",
      best_mode="min",
    )
  )
  assert same == ckpt
  with pytest.raises(ValueError, match="unknown fields.*'max_keep'"):
    kckpt.Checkpointer.from_config({"save_interval_steps": 1, "max_keep": 3})


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"max_to_keep": 0}, "max_to_keep must be a positive int"),
    ({"best_mode": "maximum"}, "best_mode must be one of"),
    ({"save_interval_steps": -5}, "save_interval_steps must be a positive int"),
    ({"keep_period": 1.5}, "keep_period must be a positive int"),
    ({"keep_time_interval": -1}, "keep_time_interval must be a positive"),
    ({"save_on_steps": [-1]}, "non-negative int"),
    ({"best_metric_path": "a", "best_fn": lambda m: 0.0}, "not both"),
    ({"save_interval_secs": 0}, "save_interval_secs must be a positive"),
    ({"workdir": 3}, "workdir must be a path"),
  ],
)
def test_contradictory_or_bad_options_rejected_at_construction(kwargs, message):
  kwargs.setdefault("save_interval_steps", 1)
  with pytest.raises(ValueError, match=message):
    kckpt.Checkpointer(**kwargs)


# -- Saving, layout, retention -----------------------------------------------


def test_layout_on_disk_is_kauldrons(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save(make_state(), step=10)
  ckpt.save(items.Composite(params=make_state()["params"], meta=items.Json({"a": 1})), step=20)
  ckpt.wait_until_finished()
  checkpoints = workdir / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("ckpt_")) == ["ckpt_10", "ckpt_20"]
  assert (checkpoints / "ckpt_10" / "default").is_dir()
  assert (checkpoints / "ckpt_20" / "params").is_dir() and (checkpoints / "ckpt_20" / "meta").is_dir()


def test_save_returns_bool_and_maybe_save_follows_interval(workdir):
  ckpt = ckpt_for(workdir, save_interval_steps=3, save_on_steps=[4], max_to_keep=None)
  saved = [s for s in range(10) if ckpt.maybe_save(make_state(), step=s)]
  ckpt.wait_until_finished()
  assert saved == [0, 3, 4, 6, 9]
  assert ckpt.all_steps == [0, 3, 4, 6, 9]
  assert ckpt.save(make_state(), step=11) is True  # save ignores the interval


def test_never_save_step_zero(workdir):
  ckpt = ckpt_for(workdir, save_interval_steps=2, never_save_step_zero=True)
  assert not ckpt.should_save(0)
  assert not ckpt.maybe_save(make_state(), step=0)
  assert ckpt.should_save(2)


def test_should_save_false_for_existing_step_and_save_never_overwrites(workdir):
  ckpt = ckpt_for(workdir, save_interval_steps=5)
  assert ckpt.should_save(5)
  ckpt.save(make_state(1.0), step=5)
  assert not ckpt.should_save(5)  # in flight counts as existing
  ckpt.wait_until_finished()
  assert not ckpt.should_save(5)
  with pytest.raises(kckpt.StepAlreadyExistsError, match="Step 5 already exists"):
    ckpt.save(make_state(2.0), step=5)
  assert ckpt.save(make_state(2.0), step=5, force=True) is False
  assert ckpt.maybe_save(make_state(2.0), step=5, force=True) is False
  restored = ckpt.restore(make_state(0.0))
  np.testing.assert_array_equal(restored["params"]["dense"]["w"], np.full((4, 4), 1.0))


def test_maybe_save_force_saves_off_interval(workdir):
  ckpt = ckpt_for(workdir, save_interval_steps=100)
  assert not ckpt.maybe_save(make_state(), step=7)
  assert ckpt.maybe_save(make_state(), step=7, force=True)
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [7]


def test_max_to_keep_keeps_newest(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=2)
  for s in range(5):
    ckpt.save(make_state(float(s)), step=s)
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [3, 4]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("ckpt")) == ["ckpt_3", "ckpt_4"]


def test_keep_period_and_max_to_keep_none(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=1, keep_period=4)
  for s in range(1, 10):
    ckpt.save({"x": np.ones(1)}, step=s)
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [4, 8, 9]
  keep_all = ckpt_for(workdir.parent / "all", max_to_keep=None)
  for s in range(5):
    keep_all.save({"x": np.ones(1)}, step=s)
  keep_all.wait_until_finished()
  assert keep_all.all_steps == [0, 1, 2, 3, 4]


def test_best_metric_keeps_best_and_newest_and_metrics_may_be_jax(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=2, best_metric_path="eval.loss", best_mode="min")
  losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.2, 5: 0.8}
  for s, loss in losses.items():
    ckpt.save({"x": np.ones(1)}, step=s, metrics={"eval": {"loss": jnp.float32(loss)}, "n": np.int64(s)})
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [2, 4, 5]  # best two (2, 4) and the newest (5)
  assert ckpt.metrics(4) == {"eval": {"loss": pytest.approx(0.2)}, "n": 4}
  assert ckpt.best_step == 2
  decisions = {d.step: d.reasons for d in ckpt.retention()}
  assert decisions == {2: ("best #1",), 4: ("best #2",), 5: ("newest",)}


def test_best_metric_survives_restart(workdir):
  first = ckpt_for(workdir, max_to_keep=1, best_metric_path="acc")
  first.save({"x": np.ones(1)}, step=1, metrics={"acc": 0.9})
  first.save({"x": np.ones(1)}, step=2, metrics={"acc": 0.1})
  first.close()
  second = ckpt_for(workdir, max_to_keep=1, best_metric_path="acc")
  second.save({"x": np.ones(1)}, step=3, metrics={"acc": 0.2})
  second.wait_until_finished()
  assert second.all_steps == [1, 3]  # step 1's score was read back from disk


def test_bad_metrics_rejected_at_save_nothing_written(workdir):
  ckpt = ckpt_for(workdir, best_metric_path="eval.loss")
  with pytest.raises(ValueError, match=r"step=1.*eval has no 'loss' \(it has: \['acc'\]\)"):
    ckpt.save({"x": np.ones(1)}, step=1, metrics={"eval": {"acc": 1.0}})
  with pytest.raises(ValueError, match=r"metrics.eval.loss: metrics must be numbers"):
    ckpt.save({"x": np.ones(1)}, step=1, metrics={"eval": {"loss": object()}})
  with pytest.raises(ValueError, match=r"must be a number"):
    ckpt.save({"x": np.ones(1)}, step=1, metrics={"eval": {"loss": "low"}})
  assert ckpt.all_steps == []


def test_nan_metric_is_saved_but_never_best(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=1, best_metric_path="loss", best_mode="min")
  ckpt.save({"x": np.ones(1)}, step=1, metrics={"loss": 1.0})
  ckpt.save({"x": np.ones(1)}, step=2, metrics={"loss": float("nan")})
  ckpt.save({"x": np.ones(1)}, step=3, metrics={"loss": 2.0})
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [1, 3]


def test_unsaveable_state_is_a_clear_error(workdir):
  ckpt = ckpt_for(workdir)
  with pytest.raises(ValueError, match=r"params.fn: .*function is not an array"):
    ckpt.save({"params": {"fn": lambda: 1, "w": np.ones(2)}}, step=1)
  with pytest.raises(ValueError, match="not JSON-serialisable"):
    ckpt.save(items.Composite(meta=items.Json({"when": datetime.datetime.now()})), step=1)
  for bad_step in (-1, 1.5, "3", True):
    with pytest.raises(ValueError, match="step must be a non-negative int"):
      ckpt.save({"w": np.ones(1)}, step=bad_step)
  assert ckpt.all_steps == []


def test_delete(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=None)
  for s in (1, 2, 3):
    ckpt.save({"x": np.ones(1)}, step=s)
  ckpt.delete(2)
  assert ckpt.all_steps == [1, 3]
  with pytest.raises(FileNotFoundError, match=r"step 2.*steps: \[1, 3\]"):
    ckpt.delete(2)
  reopened = ckpt_for(workdir, max_to_keep=None)
  reopened.delete(1)  # a step written by an earlier Checkpointer
  assert reopened.all_steps == [3]


# -- Read-only use ------------------------------------------------------------


def test_create_false_never_writes(workdir):
  writer = ckpt_for(workdir)
  writer.save(make_state(), step=1)
  writer.close()
  before = snapshot(workdir)
  reader = kckpt.Checkpointer.open(workdir)
  assert reader.all_steps == [1] and reader.latest_step == 1
  reader.restore(make_state(0.0))
  reader.item_metadata()
  assert reader.maybe_save(make_state(), step=2) is False  # open() has no save rule
  with pytest.raises(kckpt.ReadOnlyCheckpointerError):
    reader.save(make_state(), step=2)
  with pytest.raises(PermissionError):
    reader.delete(1)
  reader.close()
  assert snapshot(workdir) == before
  missing = kckpt.Checkpointer.open(workdir.parent / "missing")
  assert missing.latest_step is None and missing.all_steps == []
  assert not (workdir.parent / "missing").exists()


def test_reload_sees_steps_written_by_another_checkpointer(workdir):
  reader = kckpt.Checkpointer.open(workdir)
  assert reader.latest_step is None
  writer = ckpt_for(workdir)
  writer.save({"x": np.ones(1)}, step=4)
  writer.wait_until_finished()
  assert reader.latest_step is None  # cached until reload
  reader.reload()
  assert reader.latest_step == 4 and reader.all_steps == [4]


# -- Restoring -----------------------------------------------------------------


def test_restore_latest_and_named_step(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=None)
  for s in (1, 2):
    ckpt.save(make_state(float(s)), step=s)
  latest = ckpt.restore(make_state(0.0))
  assert float(latest["params"]["dense"]["w"][0, 0]) == 2.0
  first = ckpt.restore(make_state(0.0), step=1)
  assert float(first["params"]["dense"]["w"][0, 0]) == 1.0
  assert float(ckpt.restore(make_state(0.0), step="latest")["params"]["dense"]["w"][0, 0]) == 2.0
  with pytest.raises(FileNotFoundError, match=r"Step 7 is not in .*steps: \[1, 2\]"):
    ckpt.restore(make_state(), step=7)


def test_restore_missing_and_noop_if_missing(workdir):
  ckpt = ckpt_for(workdir)
  state = make_state()
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    ckpt.restore(state)
  assert ckpt.restore(state, noop_if_missing=True) is state
  assert not state["params"]["dense"]["w"].is_deleted()


def test_restore_without_target_gives_numpy(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save(make_state(5.0), step=1)
  tree = ckpt.restore()
  leaves = jax.tree.leaves(tree)
  assert leaves and all(isinstance(x, np.ndarray) for x in leaves)
  np.testing.assert_array_equal(tree["params"]["dense"]["w"], np.full((4, 4), 5.0, np.float32))


def test_restore_without_target_on_several_items_gives_composite(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save(items.Composite(params={"w": np.arange(3.0)}, meta=items.Json({"lr": 0.1})), step=1)
  out = ckpt.restore()
  assert isinstance(out, items.Composite) and set(out.names) == {"params", "meta"}
  assert out.meta == {"lr": 0.1}
  np.testing.assert_array_equal(out.params["w"], np.arange(3.0))


def test_mismatch_lists_every_leaf_by_path_and_keeps_target(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save({"params": {"dense": {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}}, "step": 1}, step=1)
  target = {"params": {"dense": {"w": jnp.ones((3, 4)), "extra": jnp.ones(2)}}, "step": 0}
  with pytest.raises(kckpt.TreeMismatchError) as info:
    ckpt.restore(target)
  message = str(info.value)
  assert "params.dense.w: saved (4, 4) float32, target (3, 4) float32" in message
  assert "params.dense.b: in the checkpoint" in message
  assert "params.dense.extra: in the target" in message
  assert len(info.value.problems) == 3
  assert isinstance(info.value, ValueError)
  # Donation happens only after the check: the target is intact.
  assert not target["params"]["dense"]["w"].is_deleted()


def test_donate_frees_target_after_success_only(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save(make_state(3.0), step=1)
  target = make_state(0.0)
  restored = ckpt.restore(target, donate=True)
  assert target["params"]["dense"]["w"].is_deleted()
  assert float(restored["params"]["dense"]["w"][0, 0]) == 3.0
  kept = make_state(0.0)
  ckpt.restore(kept, donate=False)
  assert not kept["params"]["dense"]["w"].is_deleted()
  missing = make_state(0.0)
  with pytest.raises(FileNotFoundError):
    ckpt.restore(missing, step=99, donate=True)
  assert not missing["params"]["dense"]["w"].is_deleted()


def test_restore_casts_dtype_and_takes_shape_dtype_structs(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save({"w": jnp.arange(4, dtype=jnp.float32)}, step=1)
  out = ckpt.restore({"w": jax.ShapeDtypeStruct((4,), jnp.bfloat16)})
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.arange(4.0))


def test_restore_best_step(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=3, best_metric_path="acc")
  for s, acc in ((1, 0.2), (2, 0.7), (3, 0.4)):
    ckpt.save({"acc": np.asarray(acc)}, step=s, metrics={"acc": acc})
  assert float(ckpt.restore(step="best")["acc"]) == pytest.approx(0.7)


def test_item_metadata_gives_shapes_and_dtypes(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save({"w": jnp.ones((2, 3), jnp.bfloat16), "n": np.zeros(5, np.int32)}, step=1)
  ckpt.save(items.Composite(a={"x": np.ones(2)}, b={"y": np.ones((1, 7))}, meta=items.Json({})), step=2)
  ckpt.wait_until_finished()
  meta = kckpt.Checkpointer.open(workdir).item_metadata(step=1)
  assert meta["w"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)
  assert meta["n"] == jax.ShapeDtypeStruct((5,), np.int32)
  several = ckpt.item_metadata()
  assert set(several.names) == {"a", "b"}  # JSON items have no arrays
  assert several.b["y"].shape == (1, 7)
  with pytest.raises(FileNotFoundError):
    ckpt.item_metadata(step=3)


# -- Async saving and errors -------------------------------------------------------


def test_async_save_returns_before_durable_and_wait_finishes(workdir, monkeypatch):
  # The step's commit (Orbax's final rename) waits for `committing`: what is seen before it
  # is set cannot be a save that happened to be fast.
  committing = _hold_finalize(monkeypatch, step=1)
  ckpt = ckpt_for(workdir)
  assert ckpt.async_save is True
  state = {"w": jnp.ones((256, 1024))}
  assert ckpt.save(state, step=1)
  # save() returned; the step is not durable yet, and nothing reports it.
  assert ckpt.all_steps == [] and kckpt.Checkpointer.open(workdir).all_steps == []
  assert [n for n in os.listdir(workdir / "checkpoints") if n.startswith("ckpt_1.")]  # being written
  assert ckpt.last_save_stats.seconds is None
  committing.set()
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [1] and kckpt.Checkpointer.open(workdir).all_steps == [1]
  assert ckpt.last_save_stats.seconds is not None
  monkeypatch.undo()
  with ckpt_for(workdir.parent / "sync", async_save=False) as sync:
    sync.save(state, step=1)
    assert sync.all_steps == [1]  # durable when save returns
    assert kckpt.Checkpointer.open(workdir.parent / "sync").all_steps == [1]
    assert sync.last_save_stats.seconds is not None
  ckpt.close()


def _hold_finalize(monkeypatch, step):
  """Makes Orbax's final rename of `step` wait until the returned event is set (at most 60 s)."""
  import threading

  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize
  release = threading.Event()

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == f"ckpt_{step}":
      release.wait(60)  # blocks only Orbax's background commit thread
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  return release


def _fail_finalize(monkeypatch, step):
  """Makes Orbax's final rename of `step` fail (a storage fault in the background)."""
  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == f"ckpt_{step}":
      raise OSError("injected storage failure")
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


@pytest.mark.parametrize("next_call", ["save", "maybe_save", "wait_until_finished", "close"])
def test_background_error_raised_at_next_call_naming_step(workdir, monkeypatch, next_call):
  ckpt = ckpt_for(workdir, save_interval_steps=1, max_to_keep=1)
  ckpt.save({"x": np.ones(3)}, step=1)
  ckpt.wait_until_finished()
  _fail_finalize(monkeypatch, step=2)
  assert ckpt.save({"x": np.ones(3)}, step=2)  # starts fine; fails in the background
  with pytest.raises(kckpt.BackgroundSaveError, match="step 2") as info:
    calls = {
      "save": lambda: ckpt.save({"x": np.ones(3)}, step=3),
      "maybe_save": lambda: ckpt.maybe_save({"x": np.ones(3)}, step=4),
      "wait_until_finished": ckpt.wait_until_finished,
      "close": ckpt.close,
    }
    calls[next_call]()
  assert info.value.step == 2 and "injected storage failure" in str(info.value.__cause__)
  from kckpt._orbax import _commit, _leafstats  # pylint: disable=import-outside-toplevel

  # The failed save's statistics and commit work are gone, not kept for a later save.
  assert not [key for key in _commit._before_commit if key.startswith(ckpt.directory.as_posix())]
  assert not [key for key in _leafstats._collectors if key[0] == ckpt.directory.as_posix()]
  # Nothing finished was lost, and the checkpointer keeps working.
  assert ckpt.all_steps == [1]
  np.testing.assert_array_equal(ckpt.restore({"x": np.zeros(3)})["x"], np.ones(3))
  assert ckpt.save({"x": np.ones(3)}, step=5)
  ckpt.wait_until_finished()
  # Step 1 outlived the failed save and is deleted by the next good one (max_to_keep=1).
  assert ckpt.all_steps == [5]


def test_noop_checkpointer():
  noop = kckpt.NoopCheckpointer()
  state = make_state()
  assert noop.restore(state) is state
  assert noop.save(state, step=1) is False
  assert noop.maybe_save(state, step=1, force=True) is False
  assert noop.should_save(0) is False
  assert noop.latest_step is None and noop.all_steps == []
  assert list(noop.iter_new_checkpoints(timeout=0)) == []
  with noop as same:
    assert same is noop
  assert isinstance(noop, kckpt.BaseCheckpointer) and isinstance(ckpt_for(None), kckpt.BaseCheckpointer)


def test_context_manager_closes_and_waits(workdir):
  with ckpt_for(workdir) as ckpt:
    ckpt.save({"x": jnp.ones((512, 512))}, step=1)
  assert kckpt.Checkpointer.open(workdir).all_steps == [1]


def test_iter_new_checkpoints_in_process(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=None)
  for s in (1, 2):
    ckpt.save({"x": np.ones(1)}, step=s)
  ckpt.wait_until_finished()
  kckpt.write_end_marker(workdir, step=2)
  reader = kckpt.Checkpointer.open(workdir)
  assert list(
    reader.iter_new_checkpoints(timeout=5, timeout_fn=lambda: kckpt.trainer_finished(workdir), poll_interval_secs=0.01)
  ) == [2]
  assert list(reader.iter_new_checkpoints(after=0, timeout_fn=lambda: True, poll_interval_secs=0.01)) == [1, 2]


def test_delete_all_steps_starts_over_and_touches_nothing_else(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=None)
  for s in (1, 2):
    ckpt.save({"x": np.ones(1)}, step=s)
  ckpt.wait_until_finished()
  (workdir / "checkpoints" / "ckpt_3.orbax-checkpoint-tmp").mkdir()
  (workdir / "notes.txt").write_text("keep me")
  (workdir / "checkpoints" / "other").mkdir()
  kckpt.write_end_marker(workdir, step=2)
  assert ckpt.delete_all_steps() == [1, 2]
  assert ckpt.all_steps == [] and not kckpt.trainer_finished(workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["RETENTION.json", "WRITER_LOCK.json", "other"]
  assert (workdir / "notes.txt").read_text() == "keep me"
  assert ckpt.save({"x": np.ones(1)}, step=1)
  with pytest.raises(PermissionError):
    kckpt.Checkpointer.open(workdir).delete_all_steps()


def test_restore_of_a_step_deleted_under_the_reader_is_not_found(workdir):
  ckpt = ckpt_for(workdir)
  ckpt.save({"x": np.ones(1)}, step=1)
  ckpt.wait_until_finished()
  reader = kckpt.Checkpointer.open(workdir)
  assert reader.all_steps == [1]
  ckpt.delete(1)
  with pytest.raises(FileNotFoundError, match="Step 1"):
    reader.restore({"x": np.zeros(1)}, step=1)


def test_summary_and_html_show_steps_time_and_metrics(workdir):
  ckpt = ckpt_for(workdir, max_to_keep=None)
  for s in range(1, 4):
    ckpt.save({"x": np.ones(1)}, step=s, metrics={"eval": {"loss": 1.0 / s}})
  ckpt.wait_until_finished()
  (workdir / "checkpoints" / "ckpt_4.orbax-checkpoint-tmp").mkdir()
  reader = kckpt.Checkpointer.open(workdir)
  text = reader.summary(max_rows=2)
  assert "3 step(s) [1, 2, 3]" in text
  assert "step        3" in text and "eval.loss=0.3333" in text and "items: default" in text
  assert "step        1" not in text  # only the newest max_rows
  assert "ckpt_4.orbax-checkpoint-tmp" in text
  page = reader._repr_html_()
  table = HtmlTable(page, "kckpt-steps")
  assert table.header[:4] == ["step", "saved", "size", "items"] and "eval.loss" in table.header
  assert table.column("step") == ["3", "2", "1"]  # newest first
  assert table.column("eval.loss") == ["0.3333", "0.5", "1"] and table.column("items") == ["default"] * 3
  assert "3 steps (1..3)" in page and "ckpt_4.orbax-checkpoint-tmp" in page
  assert "Checkpointer(" in repr(reader) and "ckpt_" not in repr(reader)  # repr stays the config: no I/O


def test_time_based_saving(workdir):
  import time

  # Not due before the interval passed: an hour, which no test run reaches.
  hourly = ckpt_for(workdir.parent / "hourly", save_interval_steps=None, save_interval_secs=3600, max_to_keep=None)
  assert not hourly.should_save(1)
  assert not hourly.maybe_save({"x": np.ones(1)}, step=1)
  assert hourly.all_steps == []
  # Due once it passed: wait for it (with a deadline).
  interval = 0.5
  created = time.time()
  ckpt = ckpt_for(workdir, save_interval_steps=None, save_interval_secs=interval, max_to_keep=None)
  due = ckpt.should_save(1)
  assert not due or time.time() - created >= interval  # not due right after creation (unless that took longer)

  def wait_until_due(step):
    deadline = time.monotonic() + 60
    while not ckpt.should_save(step):
      assert time.monotonic() < deadline, f"step {step} never became due ({interval} s interval)"
      time.sleep(0.01)  # the interval between two checks (the loop has a deadline)

  # The clock restarts at each save: right after one, the next step is not due although more than
  # the interval passed since the clock started. The check counts only when it was made within the
  # interval after the save (the save's time is the step's recorded time): a loaded machine may
  # take longer, and the test then saves again.
  step, checked = 2, False
  deadline = time.monotonic() + 60
  while not checked:
    assert time.monotonic() < deadline, "no check came within the interval after a save in 60 s"
    wait_until_due(step)
    assert ckpt.maybe_save({"x": np.ones(1)}, step=step)
    due = ckpt.should_save(step + 1)
    checked_at = time.time()
    ckpt.wait_until_finished()
    saved_at = ckpt.step_details(step).time.timestamp()
    if checked_at - saved_at < interval - 0.001:  # 1 ms: the recorded time is rounded to microseconds
      assert not due, (checked_at - saved_at, interval)
      checked = True
    step += 1
  wait_until_due(step)  # and due again once the interval passed
  ckpt.wait_until_finished()
  assert ckpt.all_steps == list(range(2, step))


def test_end_marker_rewritten_and_cleared_when_saving_again(workdir):
  kckpt.write_end_marker(workdir, step=1)
  kckpt.write_end_marker(workdir, step=2)  # a finished run finished again
  assert kckpt.trainer_finished(workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["TRAINING_FINISHED.json"]
  ckpt = ckpt_for(workdir)
  ckpt.save({"x": np.ones(1)}, step=3)  # training goes on: not finished any more
  assert not kckpt.trainer_finished(workdir)
  ckpt.close()


def test_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = kckpt.Checkpointer(workdir="runs/relative", save_interval_steps=1)
  ckpt.save({"x": np.ones(2)}, step=1)
  ckpt.wait_until_finished()
  assert (tmp_path / "runs" / "relative" / "checkpoints" / "ckpt_1").is_dir()
  assert ckpt.restore({"x": np.zeros(2)})["x"].tolist() == [1.0, 1.0]
  assert ckpt.workdir == "runs/relative"  # the config keeps what was given


def test_a_steps_time_is_one_value_for_the_live_writer_and_every_reader(workdir):
  # max_to_keep=1 with a time rule: which steps stay depends on each step's time.
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=1, keep_time_interval=3600, async_save=True)
  for step in range(4):
    ckpt.save({"w": np.full(1000, float(step))}, step=step)
  ckpt.wait_until_finished()
  live = {d.step: d.reasons for d in ckpt.retention()}
  recorded = {s: ckpt._index.record(s).time for s in ckpt.all_steps}  # pylint: disable=protected-access  # the live writer's own times
  reopened = kckpt.Checkpointer.open(workdir, max_to_keep=1, keep_time_interval=3600)
  assert {d.step: d.reasons for d in reopened.retention()} == live
  assert {s: reopened.step_details(s).time.timestamp() for s in reopened.all_steps} == recorded
  ckpt.close()
  assert live == {0: ("interval",), 3: ("newest", "latest")}
