"""`NoopCheckpointer` is a drop-in for `Checkpointer`: the same public surface, behaving as an empty run."""

import copy
import inspect
import pickle

import numpy as np
import pytest

import kckpt


def _public(cls):
  return {n for n in dir(cls) if not n.startswith("_")}


def test_noop_has_every_public_name_of_checkpointer_with_the_same_signature():
  missing = _public(kckpt.Checkpointer) - _public(kckpt.NoopCheckpointer)
  # Fields are configuration of the Orbax-backed checkpointer, not interface.
  fields = {f.name for f in kckpt.Checkpointer.__dataclass_fields__.values()}
  assert missing - fields == set()
  for name in _public(kckpt.Checkpointer) - fields:
    real, noop = getattr(kckpt.Checkpointer, name), getattr(kckpt.NoopCheckpointer, name)
    if callable(real) and not isinstance(real, property):
      assert inspect.signature(real).parameters.keys() == inspect.signature(noop).parameters.keys(), name
      for p, q in zip(inspect.signature(real).parameters.values(), inspect.signature(noop).parameters.values(), strict=True):
        assert (p.kind, p.default) == (q.kind, q.default), (name, p.name)


def test_noop_behaves_as_a_run_with_no_step():
  ckpt = kckpt.NoopCheckpointer()
  state = {"w": np.ones(2)}
  assert ckpt.save(state, step=1, tag="t") is False and ckpt.maybe_save(state, step=1) is False
  assert ckpt.restore(state, step=-1, partial=True) is state
  assert (ckpt.all_steps, ckpt.latest_step, ckpt.best_step, ckpt.retention(), ckpt.delete_all_steps()) == ([], None, None, [], [])
  assert ckpt.directory is None and ckpt.last_save_stats is None and not ckpt.reached_preemption
  assert list(ckpt.iter_new_checkpoints(timeout=0)) == []
  for read in (ckpt.metrics, ckpt.step_details, ckpt.item_metadata, ckpt.delete):
    with pytest.raises(kckpt.CheckpointNotFoundError, match="saves nothing"):
      read(3)
  with ckpt as same:
    assert same.replace() == ckpt
  assert kckpt.NoopCheckpointer.from_config({"save_interval_steps": 10}) == ckpt


def test_copies_and_pickles_of_a_used_checkpointer_carry_the_config_only(tmp_path):
  ckpt = kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=True)
  ckpt.save({"w": np.ones(2)}, step=1)
  ckpt.wait_until_finished()
  for other in (copy.copy(ckpt), copy.deepcopy(ckpt), pickle.loads(pickle.dumps(ckpt))):
    assert other == ckpt and other is not ckpt
    assert "_rt" not in vars(other)  # no writer, lock or cache came along
    assert other.all_steps == [1]
    assert other.last_save_stats is None  # the copy has saved nothing itself
  ckpt.close()
