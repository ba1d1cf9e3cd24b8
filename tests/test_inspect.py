"""Tests of `kckpt.inspect`, the read-only library behind the `kckpt` command (no CLI here)."""

from __future__ import annotations

import datetime
import math
import os

import numpy as np
import pytest
from etils import epath

import kckpt
from kckpt import inspect
from kckpt import items
from kckpt import policies
from tests.conftest import snapshot

MiB = 2**20


def saved_leaf(path, nbytes):
  return kckpt._orbax.SavedLeaf(path, "array", (nbytes,), np.dtype(np.uint8))  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Steps 10, 20, 30 of params and a JSON item, with metrics; the checkpoints/ folder."""
  workdir = tmp_path_factory.mktemp("inspect") / "run"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=10, max_to_keep=None, async_save=False) as ckpt:
    for i, step in enumerate((10, 20, 30)):
      params = {"w": np.full((8, 4), i, np.float32), "b": np.zeros(4, np.float32), "n": np.int32(step)}
      ckpt.save(
        items.Composite(params=params, meta=items.Json({"i": i})),
        step=step,
        metrics={"eval": {"loss": 1.0 - i / 10}, "lr": 0.1},
        tag="first" if step == 10 else None,
      )
  return epath.Path(workdir) / "checkpoints"


# -- Small helpers -------------------------------------------------------------


def test_leaf_batches_bound_the_bytes_read_at_once():
  leaves = [saved_leaf("a", 40), saved_leaf("b", 40), saved_leaf("c", 40), saved_leaf("big", 500), saved_leaf("d", 10)]
  batches = [[x.path for x in batch] for batch in inspect.leaf_batches(leaves, max_bytes=100)]
  assert batches == [["a", "b"], ["c"], ["big"], ["d"]]
  assert list(inspect.leaf_batches([])) == []


def test_leaf_batches_default_to_the_restore_batch_limit():
  limit = kckpt._orbax.RESTORE_BATCH_BYTES  # pylint: disable=protected-access
  assert limit == 128 * MiB
  leaves = [saved_leaf(name, 60 * MiB) for name in "abc"] + [saved_leaf("big", 200 * MiB), saved_leaf("e", 1)]
  batches = [[x.path for x in batch] for batch in inspect.leaf_batches(leaves)]
  assert batches == [["a", "b"], ["c"], ["big"], ["e"]]


def test_compare_values_reports_max_abs_and_relative_difference():
  a = np.array([1.0, -4.0, 2.0, np.nan], np.float32)
  b = np.array([1.5, -4.0, 2.0, np.nan], np.float32)
  assert inspect.compare_values(a, b) == (True, 0.5, 0.5 / 4.0)  # NaN in both places is equal
  assert inspect.compare_values(a, a.copy()) == (False, 0.0, 0.0)
  changed, max_abs, _ = inspect.compare_values(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
  assert changed and math.isnan(max_abs)
  assert inspect.compare_values(np.int32(100), np.int32(400)) == (True, 300.0, 3.0)
  assert inspect.compare_values("a", "b") == (True, None, None)
  assert inspect.compare_values(np.zeros(3), np.zeros(4)) == (True, None, None)
  assert inspect.compare_values(np.zeros(2), np.array([0.0, 1.0])) == (True, 1.0, math.inf)  # A is all zeros


def test_flatten_metrics_joins_nested_keys_with_dots():
  assert inspect.flatten_metrics({"eval": {"loss": 0.5, "acc": {"top1": 0.9}}, "lr": 1e-3}) == {
    "eval.loss": 0.5,
    "eval.acc.top1": 0.9,
    "lr": 1e-3,
  }
  assert inspect.flatten_metrics(None) == {} and inspect.flatten_metrics({}) == {}
  assert inspect.flatten_metrics({"a": {}}) == {}


def test_format_time_is_utc():
  plus_one = datetime.timezone(datetime.timedelta(hours=1))
  assert inspect.format_time(datetime.datetime(2026, 12, 1, 9, 13, 29, tzinfo=plus_one)) == "2026-12-01 08:13:29 UTC"
  assert inspect.format_time(datetime.datetime(2026, 12, 1, 8, 13, 29, 999, tzinfo=datetime.UTC)) == ("2026-12-01 08:13:29 UTC")
  assert inspect.format_time(None) == "?"


def test_short_error_and_leaf_labels():
  assert inspect.short_error(ValueError("bad [tensorstore_spec={...}]\ndetails")) == "ValueError: bad"
  assert inspect.short_error(KeyError()) == "KeyError"
  assert inspect.short_error(OSError("x" * 300), limit=20) == "OSError: xxxxxxxxxxxxxxxxx..."
  assert inspect.leaf_label("default", "params.w") == "params.w"
  assert inspect.leaf_label("opt_state", "mu.w") == "opt_state/mu.w"


# -- Reading a run ---------------------------------------------------------------


def test_summary_rows_with_and_without_retention(run):
  rows = inspect.summary_rows(run, retention=policies.RetentionPolicy(max_to_keep=1, keep_period=20))
  assert [(r.step, r.decision.reasons) for r in rows] == [(10, ()), (20, ("period",)), (30, ("newest", "latest"))]
  first = rows[0].as_dict()
  assert first["metrics"] == {"eval.loss": 1.0, "lr": 0.1} and first["items"] == ["meta", "params"]
  assert first["tag"] == "first" and first["keep"] is False and first["kept_by"] == []
  assert first["size_bytes"] > 0 and first["time"].endswith("+00:00")
  # Some steps only, no sizes, no policy: no retention keys; a step that is not finished is left out.
  rows = inspect.summary_rows(run, [30, 20, 25], sizes=False)
  assert [r.step for r in rows] == [30, 20]
  assert rows[0].size_bytes is None and "keep" not in rows[0].as_dict()


def test_item_tree_and_read_pytree(run):
  step = run / "ckpt_20"
  assert inspect.user_items(step) == {"params": "pytree", "meta": "json"}  # not Orbax's metrics item
  tree = inspect.item_tree(step, "params", "pytree")
  assert {leaf.path: inspect.spec_str(leaf) for leaf in tree.leaves} == {
    "b": "(4,) float32",
    "n": "scalar int32",
    "w": "(8, 4) float32",
  }
  assert tree.nbytes == 8 * 4 * 4 + 4 * 4 + 4 and tree.as_dict()["bytes"] == tree.nbytes and tree.disk_bytes > 0
  assert "leaves" not in inspect.item_tree(step, "meta", "json").as_dict()
  seen = []
  values, leaves = inspect.read_pytree(step / "params", progress=seen.append)
  np.testing.assert_array_equal(values["w"], np.full((8, 4), 1, np.float32))
  assert len(leaves) == 3 and seen == ["3/3 leaves"]
  assert inspect.read_json_item(step, "meta") == {"i": 1}


def test_diff_steps_and_diff_item(run, capsys):
  seen = []
  diff = inspect.diff_steps(run / "ckpt_10", run / "ckpt_30", progress=seen.append)
  assert not diff.equal
  changed = {d.leaf: d for d in diff.changed}
  assert sorted(changed) == ["meta/<json>", "params/n", "params/w"]
  assert changed["params/w"].max_abs_diff == 2.0 and changed["params/n"].max_abs_diff == 20.0
  assert diff.identical == 1 and diff.only_in_a == diff.only_in_b == []
  assert seen[-1] == "3/3 leaves"
  same = inspect.diff_item(inspect.open_reader(run / "ckpt_20" / "params"), inspect.open_reader(run / "ckpt_20" / "params"))
  assert same.equal and same.identical == 3
  assert same.as_dict() == {"only_in_a": [], "only_in_b": [], "changed": [], "identical": 3, "equal": True}
  assert capsys.readouterr() == ("", "")  # never prints


def test_verify_step_is_read_only_and_finds_nothing_in_a_good_step(run):
  before = snapshot(run)
  seen = []
  report = inspect.verify_step(run, 20, progress=seen.append)
  assert report.ok and (report.items, report.leaves, report.bytes) == (3, 3, 8 * 4 * 4 + 4 * 4 + 4)  # params, meta, metrics
  assert seen and seen[-1] == "params: 3/3 leaves"
  assert snapshot(run) == before


def test_verify_step_names_the_leaf_of_a_corrupted_file_and_non_finite_values(tmp_path):
  workdir = tmp_path / "run"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"w": np.ones((64, 64), np.float32), "b": np.array([0.0, np.nan], np.float32)}, step=1)
  checkpoints = epath.Path(workdir) / "checkpoints"
  report = inspect.verify_step(checkpoints, 1, check_finite=True)
  assert [str(p) for p in report.problems] == ["step 1, item default, leaf b: 1 of 2 values are NaN or infinite"]
  assert inspect.verify_step(checkpoints, 1).ok  # NaN is only a problem when asked for
  for path in (checkpoints / "ckpt_1" / "default" / "ocdbt.process_0" / "d").iterdir():
    os.truncate(path, 8)
  report = inspect.verify_step(checkpoints, 1)
  assert not report.ok and not report.deleted
  assert {(p.step, p.item, p.leaf) for p in report.problems} >= {(1, "default", "w")}
  assert all(p.problem.startswith("unreadable: ") for p in report.problems)
  assert report.as_dict()["problems"][0].keys() == {"step", "item", "leaf", "problem"}
  assert inspect.verify_step(checkpoints, 2).deleted  # not there: reported as gone, not as a problem


def test_check_leaf_value():
  leaf = saved_leaf("w", 4)
  assert inspect.check_leaf_value(leaf, np.zeros(4, np.uint8)) is None
  assert inspect.check_leaf_value(leaf, np.zeros(4, np.int8)) == "read dtype int8, metadata says uint8"
  assert inspect.check_leaf_value(leaf, 3) == "read a int, metadata says an array (4,) uint8"
