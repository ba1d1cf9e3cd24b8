"""Unit and property tests of kckpt.policies: pure functions, no disk."""

from __future__ import annotations

import dataclasses
import datetime
import math
import random

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kckpt.policies import (
  KeepDecision,
  RetentionPolicy,
  SavePolicy,
  StepRecord,
  as_score,
  decide_retention,
  metric_at_path,
  save_reason,
  steps_to_delete,
  timedelta_seconds,
  to_json_metrics,
)

NAN = float("nan")


def loss(value):
  return {"eval": {"loss": value}}


def kept(decisions):
  return [d.step for d in decisions if d.keep]


def reasons_by_step(decisions):
  return {d.step: d.reasons for d in decisions}


# ---------------------------------------------------------------------------
# save_reason
# ---------------------------------------------------------------------------


class TestSaveReason:
  def test_interval(self):
    policy = SavePolicy(interval_steps=10)
    assert [s for s in range(0, 35) if save_reason(policy, s) == "interval"] == [0, 10, 20, 30]
    assert all(save_reason(policy, s) is None for s in range(35) if s % 10)

  def test_no_rule_never_saves(self):
    policy = SavePolicy()
    assert all(save_reason(policy, s, now=1e9, last_save_time=0.0) is None for s in range(0, 50, 7))

  def test_on_steps(self):
    policy = SavePolicy(on_steps=frozenset({3, 17}))
    assert save_reason(policy, 3) == "on_steps"
    assert save_reason(policy, 17) == "on_steps"
    assert save_reason(policy, 4) is None
    assert save_reason(policy, 0) is None

  def test_on_steps_with_interval(self):
    policy = SavePolicy(interval_steps=10, on_steps=frozenset({5, 10}))
    assert save_reason(policy, 5) == "on_steps"
    assert save_reason(policy, 10) == "interval"  # Interval is checked first.
    assert save_reason(policy, 20) == "interval"
    assert save_reason(policy, 15) is None

  def test_time_rule(self):
    policy = SavePolicy(interval_secs=60.0)
    assert save_reason(policy, 7, now=100.0, last_save_time=40.0) == "time"  # exactly 60 s
    assert save_reason(policy, 7, now=1000.0, last_save_time=40.0) == "time"
    assert save_reason(policy, 7, now=99.9, last_save_time=40.0) is None

  def test_time_rule_needs_both_times(self):
    policy = SavePolicy(interval_secs=60.0)
    assert save_reason(policy, 7) is None
    assert save_reason(policy, 7, now=1000.0) is None
    assert save_reason(policy, 7, last_save_time=0.0) is None

  def test_time_rule_off_without_interval_secs(self):
    assert save_reason(SavePolicy(interval_steps=10), 7, now=1e9, last_save_time=0.0) is None

  def test_step_rules_win_over_time(self):
    policy = SavePolicy(interval_steps=10, on_steps=frozenset({7}), interval_secs=1.0)
    assert save_reason(policy, 10, now=100.0, last_save_time=0.0) == "interval"
    assert save_reason(policy, 7, now=100.0, last_save_time=0.0) == "on_steps"
    assert save_reason(policy, 8, now=100.0, last_save_time=0.0) == "time"

  def test_step_zero_saved_by_default(self):
    assert save_reason(SavePolicy(interval_steps=10), 0) == "interval"
    assert save_reason(SavePolicy(on_steps=frozenset({0})), 0) == "on_steps"
    assert save_reason(SavePolicy(interval_secs=1.0), 0, now=10.0, last_save_time=0.0) == "time"

  def test_never_save_step_zero(self):
    policy = SavePolicy(interval_steps=10, on_steps=frozenset({0, 3}), interval_secs=1.0, never_save_step_zero=True)
    assert save_reason(policy, 0) is None
    assert save_reason(policy, 0, now=100.0, last_save_time=0.0) is None
    # Only step 0 is affected.
    assert save_reason(policy, 10) == "interval"
    assert save_reason(policy, 3) == "on_steps"
    assert save_reason(policy, 1, now=100.0, last_save_time=0.0) == "time"


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


class TestToJsonMetrics:
  def test_plain_values_pass_through(self):
    metrics = {"loss": 1.5, "step": 3, "ok": True, "name": "x", "none": None, "nested": {"a": [1, 2.5], "t": (3, 4)}}
    out = to_json_metrics(metrics)
    assert out == {"loss": 1.5, "step": 3, "ok": True, "name": "x", "none": None, "nested": {"a": [1, 2.5], "t": [3, 4]}}
    assert type(out["ok"]) is bool
    assert type(out["step"]) is int
    assert type(out["nested"]["t"]) is list

  def test_keys_become_strings(self):
    assert to_json_metrics({1: 2.0}) == {"1": 2.0}

  @pytest.mark.parametrize(
    "value, expected, kind",
    [
      (np.float32(1.5), 1.5, float),
      (np.float64(-2.25), -2.25, float),
      (np.float16(0.5), 0.5, float),
      (np.int64(3), 3, int),
      (np.int8(-4), -4, int),
      (np.uint32(7), 7, int),
      (np.bool_(True), True, bool),
      (np.array(2.5), 2.5, float),
      (np.array([4]), 4, int),
      (np.array([0.5], dtype=np.float32), 0.5, float),
    ],
  )
  def test_numpy_scalars(self, value, expected, kind):
    out = to_json_metrics({"eval": {"m": value}})["eval"]["m"]
    assert out == expected
    assert type(out) is kind

  @pytest.mark.parametrize(
    "value, expected, kind",
    [
      (jnp.array(2.5), 2.5, float),
      (jnp.array(2.5, dtype=jnp.bfloat16), 2.5, float),
      (jnp.array([3], dtype=jnp.int32), 3, int),
      (jnp.array([1.25], dtype=jnp.float32), 1.25, float),
      (jnp.array(True), True, bool),
      (jnp.float32(0.75), 0.75, float),
    ],
  )
  def test_jax_scalars(self, value, expected, kind):
    out = to_json_metrics({"eval": {"m": value}})["eval"]["m"]
    assert out == expected
    assert type(out) is kind

  def test_nan_is_kept(self):
    assert math.isnan(to_json_metrics({"x": np.float32("nan")})["x"])

  @pytest.mark.parametrize("value", [jnp.ones(3), np.ones(2), jnp.ones((1, 1)), np.zeros((2, 2))])
  def test_rejects_arrays_naming_the_path(self, value):
    with pytest.raises(ValueError) as e:
      to_json_metrics({"eval": {"loss": value}})
    message = str(e.value)
    assert message.startswith("metrics.eval.loss:")
    assert str(tuple(value.shape)) in message

  @pytest.mark.parametrize("value", [object(), {1, 2}, 1j, b"bytes"])
  def test_rejects_objects_naming_the_path(self, value):
    with pytest.raises(ValueError, match=r"^metrics\.eval\.loss: metrics must be numbers, got " + type(value).__name__):
      to_json_metrics({"eval": {"loss": value}})

  def test_error_path_in_lists_and_custom_root(self):
    with pytest.raises(ValueError, match=r"^metrics\.hist\[2\]:"):
      to_json_metrics({"hist": [1.0, 2.0, object()]})
    with pytest.raises(ValueError, match=r"^m\.a:"):
      to_json_metrics({"a": object()}, path="m")

  def test_error_names_the_first_bad_value_only(self):
    with pytest.raises(ValueError, match=r"^metrics\.train\.acc:"):
      to_json_metrics({"train": {"loss": 1.0, "acc": np.ones(3)}})


class TestMetricAtPath:
  def test_found(self):
    metrics = {"eval": {"loss": 0.5, "sub": {"x": 3}}, "top": 1}
    assert metric_at_path(metrics, "top") == 1
    assert metric_at_path(metrics, "eval.loss") == 0.5
    assert metric_at_path(metrics, "eval.sub.x") == 3
    assert metric_at_path(metrics, "eval.sub") == {"x": 3}

  def test_missing_top_level(self):
    with pytest.raises(KeyError) as e:
      metric_at_path({"train": {}, "step": 1}, "eval.loss")
    message = e.value.args[0]
    assert "'eval.loss'" in message
    assert "<metrics> has no 'eval'" in message
    assert "['step', 'train']" in message

  def test_missing_nested(self):
    with pytest.raises(KeyError) as e:
      metric_at_path({"eval": {"f1": 1.0, "acc": 2.0}}, "eval.loss")
    message = e.value.args[0]
    assert "eval has no 'loss'" in message
    assert "['acc', 'f1']" in message

  def test_walks_past_a_leaf(self):
    with pytest.raises(KeyError) as e:
      metric_at_path({"eval": {"loss": 1.0}}, "eval.loss.mean")
    message = e.value.args[0]
    assert "eval.loss has no 'mean'" in message
    assert "float" in message


class TestAsScore:
  def test_numbers(self):
    assert as_score(3, what="x") == 3.0
    assert type(as_score(3, what="x")) is float
    assert as_score(np.float32(0.5), what="x") == 0.5
    assert math.isnan(as_score(NAN, what="x"))
    assert as_score(float("inf"), what="x") == float("inf")

  @pytest.mark.parametrize("value", [True, "1.0", None, [1.0], 1j])
  def test_non_numbers(self, value):
    with pytest.raises(ValueError, match=r"^my metric must be a number, got " + type(value).__name__):
      as_score(value, what="my metric")


class TestScore:
  def test_no_ranking(self):
    assert RetentionPolicy().score(loss(1.0)) is None

  def test_metric_path(self):
    policy = RetentionPolicy(best_metric_path="eval.loss")
    assert policy.score(loss(1.5)) == 1.5
    assert policy.score(loss(2)) == 2.0
    assert policy.score(None) is None
    assert policy.score(loss(NAN)) is None
    assert policy.score({"eval": {}}) is None
    assert policy.score({"other": 1.0}) is None
    assert policy.score(loss("high")) is None
    assert policy.score(loss(True)) is None

  def test_best_fn(self):
    policy = RetentionPolicy(best_fn=lambda m: m["a"] - m["b"])
    assert policy.ranks_by_metric
    assert policy.score({"a": 5.0, "b": 2.0}) == 3.0
    assert policy.score({"a": 5.0}) is None  # KeyError inside best_fn
    assert policy.score({"a": NAN, "b": 0.0}) is None
    assert RetentionPolicy(best_fn=lambda m: True).score({}) is None
    assert RetentionPolicy(best_fn=lambda m: "x").score({}) is None


# ---------------------------------------------------------------------------
# decide_retention
# ---------------------------------------------------------------------------


class TestDecideRetention:
  def test_empty(self):
    assert decide_retention(RetentionPolicy(), []) == []

  def test_docstring_example(self):
    policy = RetentionPolicy(max_to_keep=2, keep_period=100)
    assert kept(decide_retention(policy, [StepRecord(s) for s in (100, 150, 200, 250)])) == [100, 200, 250]

  def test_sorted_by_step_whatever_the_input_order(self):
    records = [StepRecord(s) for s in (5, 1, 4, 2, 3)]
    decisions = decide_retention(RetentionPolicy(max_to_keep=2), records)
    assert [d.step for d in decisions] == [1, 2, 3, 4, 5]
    assert decisions == decide_retention(RetentionPolicy(max_to_keep=2), sorted(records, key=lambda r: r.step))

  def test_latest_n(self):
    decisions = decide_retention(RetentionPolicy(max_to_keep=2), [StepRecord(s) for s in range(1, 6)])
    assert reasons_by_step(decisions) == {1: (), 2: (), 3: (), 4: ("latest",), 5: ("newest", "latest")}
    assert [d.keep for d in decisions] == [False, False, False, True, True]
    assert all(d.score is None for d in decisions)

  def test_latest_ignores_metrics(self):
    records = [StepRecord(1, metrics=loss(0.0)), StepRecord(2, metrics=loss(9.0)), StepRecord(3)]
    assert kept(decide_retention(RetentionPolicy(max_to_keep=1), records)) == [3]

  def test_max_to_keep_one(self):
    decisions = decide_retention(RetentionPolicy(max_to_keep=1), [StepRecord(s) for s in (10, 20)])
    assert reasons_by_step(decisions) == {10: (), 20: ("newest", "latest")}

  def test_max_to_keep_more_than_steps(self):
    decisions = decide_retention(RetentionPolicy(max_to_keep=5), [StepRecord(s) for s in (1, 2)])
    assert reasons_by_step(decisions) == {1: ("latest",), 2: ("newest", "latest")}

  def test_max_to_keep_none_keeps_all(self):
    decisions = decide_retention(RetentionPolicy(max_to_keep=None), [StepRecord(s) for s in range(20)])
    assert kept(decisions) == list(range(20))
    assert all("latest" in d.reasons for d in decisions)

  def test_single_step(self):
    assert decide_retention(RetentionPolicy(max_to_keep=1), [StepRecord(7)]) == [
      KeepDecision(step=7, keep=True, reasons=("newest", "latest"))
    ]
    # Ranked by a metric, a step without metrics is kept only as the newest.
    assert decide_retention(RetentionPolicy(max_to_keep=1, best_metric_path="eval.loss"), [StepRecord(7)]) == [
      KeepDecision(step=7, keep=True, reasons=("newest",))
    ]

  def test_keep_period(self):
    policy = RetentionPolicy(max_to_keep=1, keep_period=100)
    decisions = decide_retention(policy, [StepRecord(s) for s in (0, 50, 100, 150, 200, 250)])
    assert reasons_by_step(decisions) == {
      0: ("period",),
      50: (),
      100: ("period",),
      150: (),
      200: ("period",),
      250: ("newest", "latest"),
    }

  def test_keep_period_on_newest(self):
    decisions = decide_retention(RetentionPolicy(max_to_keep=1, keep_period=10), [StepRecord(5), StepRecord(20)])
    assert reasons_by_step(decisions) == {5: (), 20: ("newest", "latest", "period")}

  def test_keep_time_interval(self):
    # Interval 60: the first, then the first >= 60 after the last kept one.
    times = {1: 0.0, 2: 10.0, 3: 30.0, 4: 59.9, 5: 60.0, 6: 61.0, 7: 119.0, 8: 125.0, 9: 130.0}
    policy = RetentionPolicy(max_to_keep=1, keep_time_interval_secs=60)
    decisions = decide_retention(policy, [StepRecord(s, time=t) for s, t in times.items()])
    interval = [d.step for d in decisions if "interval" in d.reasons]
    assert interval == [1, 5, 8]
    assert kept(decisions) == [1, 5, 8, 9]
    assert reasons_by_step(decisions)[9] == ("newest", "latest")

  def test_keep_time_interval_measured_from_last_kept_not_a_grid(self):
    times = {1: 0.0, 2: 70.0, 3: 125.0, 4: 131.0, 5: 140.0}
    policy = RetentionPolicy(max_to_keep=1, keep_time_interval_secs=60)
    decisions = decide_retention(policy, [StepRecord(s, time=t) for s, t in times.items()])
    # 125 is past the 120 s grid line but only 55 s after 70: not kept; 131 is.
    assert [d.step for d in decisions if "interval" in d.reasons] == [1, 2, 4]

  def test_keep_time_interval_unknown_time_never_kept(self):
    records = [
      StepRecord(1, time=None),
      StepRecord(2, time=100.0),
      StepRecord(3, time=None),
      StepRecord(4, time=130.0),
      StepRecord(5, time=170.0),
      StepRecord(6, time=None),
      StepRecord(7, time=None),
    ]
    policy = RetentionPolicy(max_to_keep=1, keep_time_interval_secs=60)
    decisions = decide_retention(policy, records)
    # The first step with a known time is the first kept by the rule.
    assert reasons_by_step(decisions) == {1: (), 2: ("interval",), 3: (), 4: (), 5: ("interval",), 6: (), 7: ("newest", "latest")}

  def test_keep_time_interval_all_unknown(self):
    policy = RetentionPolicy(max_to_keep=1, keep_time_interval_secs=60)
    assert kept(decide_retention(policy, [StepRecord(s) for s in range(5)])) == [4]

  def test_best_max(self):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.acc", best_mode="max")
    accs = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8, 5: 0.1}
    decisions = decide_retention(policy, [StepRecord(s, metrics={"eval": {"acc": a}}) for s, a in accs.items()])
    assert reasons_by_step(decisions) == {1: (), 2: ("best #1",), 3: (), 4: ("best #2",), 5: ("newest",)}
    assert {d.step: d.score for d in decisions} == accs

  def test_best_min(self):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode="min")
    losses = {1: 0.5, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.8}
    decisions = decide_retention(policy, [StepRecord(s, metrics=loss(v)) for s, v in losses.items()])
    assert reasons_by_step(decisions) == {1: (), 2: (), 3: ("best #1",), 4: ("best #2",), 5: ("newest",)}

  def test_best_fn(self):
    policy = RetentionPolicy(max_to_keep=1, best_fn=lambda m: m["a"] * m["b"], best_mode="max")
    records = [
      StepRecord(1, metrics={"a": 2, "b": 5}),
      StepRecord(2, metrics={"a": 3, "b": 3}),
      StepRecord(3, metrics={"a": 1, "b": 1}),
    ]
    decisions = decide_retention(policy, records)
    assert reasons_by_step(decisions) == {1: ("best #1",), 2: (), 3: ("newest",)}
    assert [d.score for d in decisions] == [10.0, 9.0, 1.0]

  def test_newest_kept_in_addition_to_best_n(self):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode="min")
    records = [StepRecord(s, metrics=loss(v)) for s, v in {1: 1.0, 2: 2.0, 3: 3.0, 4: 9.0}.items()]
    assert reasons_by_step(decide_retention(policy, records)) == {1: ("best #1",), 2: ("best #2",), 3: (), 4: ("newest",)}

  def test_newest_that_is_best(self):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode="min")
    records = [StepRecord(s, metrics=loss(v)) for s, v in {1: 1.0, 2: 2.0, 3: 3.0, 4: 0.5}.items()]
    assert reasons_by_step(decide_retention(policy, records)) == {1: ("best #2",), 2: (), 3: (), 4: ("newest", "best #1")}

  def test_best_with_max_to_keep_none_ranks_all(self):
    policy = RetentionPolicy(max_to_keep=None, best_metric_path="eval.loss", best_mode="min")
    records = [
      StepRecord(1, metrics=loss(3.0)),
      StepRecord(2, metrics=None),
      StepRecord(3, metrics=loss(1.0)),
      StepRecord(4, metrics=loss(2.0)),
      StepRecord(5),
    ]
    assert reasons_by_step(decide_retention(policy, records)) == {
      1: ("best #3",),
      2: (),
      3: ("best #1",),
      4: ("best #2",),
      5: ("newest",),
    }

  @pytest.mark.parametrize("unranked", [None, loss(NAN), {"eval": {}}, {"train": {"loss": 0.0}}, loss("bad")])
  def test_unranked_steps(self, unranked):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode="min")
    records = [
      StepRecord(1, metrics=unranked),
      StepRecord(2, metrics=loss(5.0)),
      StepRecord(3, metrics=unranked),
      StepRecord(4, metrics=loss(6.0)),
      StepRecord(5, metrics=unranked),
    ]
    decisions = decide_retention(policy, records)
    # Unranked steps take no rank: the two scored steps are #1 and #2.
    assert reasons_by_step(decisions) == {1: (), 2: ("best #1",), 3: (), 4: ("best #2",), 5: ("newest",)}
    assert [d.score for d in decisions] == [None, 5.0, None, 6.0, None]

  def test_unranked_steps_kept_by_other_rules(self):
    policy = RetentionPolicy(
      max_to_keep=1, best_metric_path="eval.loss", best_mode="min", keep_period=10, keep_time_interval_secs=100
    )
    records = [
      StepRecord(5, time=0.0, metrics=None),
      StepRecord(10, time=10.0, metrics=loss(NAN)),
      StepRecord(11, time=20.0, metrics=loss(1.0)),
      StepRecord(12, time=150.0, metrics=None),
      StepRecord(13, time=160.0, metrics=loss(NAN)),
      StepRecord(14, time=170.0, metrics=loss(NAN)),
    ]
    assert reasons_by_step(decide_retention(policy, records)) == {
      5: ("interval",),
      10: ("period",),
      11: ("best #1",),
      12: ("interval",),
      13: (),
      14: ("newest",),
    }

  def test_only_unranked_steps(self):
    policy = RetentionPolicy(max_to_keep=3, best_metric_path="eval.loss")
    decisions = decide_retention(policy, [StepRecord(s, metrics=loss(NAN)) for s in range(4)])
    assert reasons_by_step(decisions) == {0: (), 1: (), 2: (), 3: ("newest",)}

  @pytest.mark.parametrize("mode", ["max", "min"])
  def test_ties_newer_ranks_higher(self, mode):
    policy = RetentionPolicy(max_to_keep=2, best_metric_path="eval.loss", best_mode=mode)
    records = [StepRecord(s, metrics=loss(1.0)) for s in (1, 2, 3)] + [StepRecord(4, metrics=loss(1.0 if mode == "max" else 2.0))]
    if mode == "max":
      # All equal: 4 is newest and best #1, 3 is #2.
      assert reasons_by_step(decide_retention(policy, records)) == {1: (), 2: (), 3: ("best #2",), 4: ("newest", "best #1")}
    else:
      assert reasons_by_step(decide_retention(policy, records)) == {1: (), 2: ("best #2",), 3: ("best #1",), 4: ("newest",)}

  def test_tie_with_max_to_keep_one_keeps_the_newer(self):
    policy = RetentionPolicy(max_to_keep=1, best_metric_path="eval.loss", best_mode="min")
    records = [StepRecord(1, metrics=loss(0.5)), StepRecord(2, metrics=loss(0.5)), StepRecord(3, metrics=loss(0.9))]
    assert reasons_by_step(decide_retention(policy, records)) == {1: (), 2: ("best #1",), 3: ("newest",)}

  def test_infinite_scores_are_ranked(self):
    policy = RetentionPolicy(max_to_keep=1, best_metric_path="eval.loss", best_mode="min")
    records = [
      StepRecord(1, metrics=loss(float("inf"))),
      StepRecord(2, metrics=loss(-float("inf"))),
      StepRecord(3, metrics=loss(0.0)),
    ]
    assert reasons_by_step(decide_retention(policy, records)) == {1: (), 2: ("best #1",), 3: ("newest",)}

  def test_all_reasons_in_order(self):
    policy = RetentionPolicy(
      max_to_keep=1, keep_period=10, keep_time_interval_secs=5, best_metric_path="eval.loss", best_mode="min"
    )
    decisions = decide_retention(policy, [StepRecord(10, time=0.0, metrics=loss(0.1))])
    assert decisions == [KeepDecision(step=10, keep=True, reasons=("newest", "best #1", "period", "interval"), score=0.1)]
    policy = dataclasses.replace(policy, best_metric_path=None)
    decisions = decide_retention(policy, [StepRecord(10, time=0.0)])
    assert decisions[0].reasons == ("newest", "latest", "period", "interval")

  def test_keep_decision_as_dict(self):
    decision = KeepDecision(step=3, keep=True, reasons=("newest", "best #1"), score=0.5)
    assert decision.as_dict() == {"step": 3, "keep": True, "reasons": ("newest", "best #1"), "score": 0.5}
    assert KeepDecision(step=1, keep=False).as_dict() == {"step": 1, "keep": False, "reasons": (), "score": None}

  def test_steps_to_delete(self):
    policy = RetentionPolicy(max_to_keep=2, keep_period=3)
    assert steps_to_delete(policy, [StepRecord(s) for s in range(1, 9)]) == [1, 2, 4, 5]

  def test_timedelta_seconds(self):
    assert timedelta_seconds(None) is None
    assert timedelta_seconds(datetime.timedelta(minutes=2)) == 120.0
    assert timedelta_seconds(5) == 5.0
    assert type(timedelta_seconds(5)) is float


# ---------------------------------------------------------------------------
# Property tests: a trainer that saves, then deletes what retention drops
# ---------------------------------------------------------------------------

PATH_LOSS = "eval.loss"


def _fn_score(metrics):
  # An independent best_fn: negated loss, ranked with "max", so the best is the lowest loss.
  return -metrics["eval"]["loss"]


@st.composite
def policies(draw):
  ranking = draw(st.sampled_from(["none", "max", "min", "fn"]))
  return RetentionPolicy(
    max_to_keep=draw(st.one_of(st.none(), st.integers(1, 4))),
    keep_period=draw(st.one_of(st.none(), st.integers(2, 6))),
    keep_time_interval_secs=draw(st.one_of(st.none(), st.sampled_from([1.0, 2.5, 10.0]))),
    best_metric_path=PATH_LOSS if ranking in ("max", "min") else None,
    best_fn=_fn_score if ranking == "fn" else None,
    best_mode="min" if ranking == "min" else "max",
  )


# A save: (step gap, clock gap, time known, metrics, restart after it).
# Metrics: None, NaN, missing the ranked key, or a loss in a small range (many
# ties) or a wide one.
_METRICS = st.one_of(
  st.sampled_from([None, loss(NAN), {"eval": {"acc": 1.0}}]),
  st.integers(-3, 3).map(lambda v: loss(float(v))),
  st.floats(-100, 100, allow_nan=False).map(loss),
)
_SAVE = st.tuples(
  st.integers(1, 4),
  st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0, 12.0, -2.0]),  # -2: clock skew
  st.integers(0, 3),  # 0: time unknown
  _METRICS,
  st.booleans(),
)


@st.composite
def schedules(draw):
  """A list of saves (StepRecord, restart_after) with increasing steps."""
  step = draw(st.integers(0, 3))
  clock = 1000.0
  saves = []
  for step_gap, clock_gap, time_known, metrics, restart in draw(st.lists(_SAVE, min_size=1, max_size=25)):
    clock += clock_gap
    saves.append((StepRecord(step, time=clock if time_known else None, metrics=metrics), restart))
    step += step_gap
  return saves


def oracle_score(policy, metrics):
  """The score, computed without RetentionPolicy.score."""
  if not policy.ranks_by_metric or metrics is None:
    return None
  value = metrics.get("eval", {}).get("loss")
  if value is None or math.isnan(value):
    return None
  return -value if policy.best_fn is not None else value


def better(policy, a, b):
  """Whether ranked record `a` (step, score) ranks strictly above `b`."""
  (sa, xa), (sb, xb) = a, b
  if xa != xb:
    return xa > xb if policy.best_mode == "max" else xa < xb
  return sa > sb  # Equal scores: the newer step ranks higher.


def check_invariants(policy, records, decisions):
  by_step = {r.step: r for r in records}
  steps = sorted(by_step)
  assert [d.step for d in decisions] == steps
  newest = steps[-1]
  scores = {s: oracle_score(policy, by_step[s].metrics) for s in steps}
  ranked = [(s, scores[s]) for s in steps if scores[s] is not None]
  limit = len(steps) if policy.max_to_keep is None else policy.max_to_keep

  # Interval rule, checked declaratively: the first known time is kept, kept
  # times are at least `interval` after the previous kept one, and every other
  # known time comes less than `interval` after the last kept before it.
  interval_steps = {d.step for d in decisions if "interval" in d.reasons}
  if policy.keep_time_interval_secs:
    last_kept_time = None
    for s in steps:
      t = by_step[s].time
      if t is None:
        assert s not in interval_steps
      elif last_kept_time is None or t - last_kept_time >= policy.keep_time_interval_secs:
        assert s in interval_steps
        last_kept_time = t
      else:
        assert s not in interval_steps
  else:
    assert not interval_steps

  period_steps = {s for s in steps if policy.keep_period and s % policy.keep_period == 0}

  for d in decisions:
    s = d.step
    assert d.keep == bool(d.reasons), d
    assert len(set(d.reasons)) == len(d.reasons), d
    assert d.score == scores[s] or (d.score is None and scores[s] is None), (d, scores[s])
    expected = []
    if s == newest:
      expected.append("newest")
    if policy.ranks_by_metric:
      if scores[s] is not None:
        rank = 1 + sum(better(policy, other, (s, scores[s])) for other in ranked if other[0] != s)
        if rank <= limit:
          expected.append(f"best #{rank}")
    elif steps.index(s) >= len(steps) - limit:
      expected.append("latest")
    if s in period_steps:
      expected.append("period")
    if s in interval_steps:
      expected.append("interval")
    assert d.reasons == tuple(expected), (d, expected)

  kept_steps = [d.step for d in decisions if d.keep]
  assert newest in kept_steps
  # The best `max_to_keep` ranked steps on disk are all kept.
  if policy.ranks_by_metric:
    order = sorted(ranked, key=lambda p: sum(better(policy, o, p) for o in ranked))
    assert {s for s, _ in order[:limit]} <= set(kept_steps)
  bound = limit + 1 + len(period_steps) + len(interval_steps)
  assert len(kept_steps) <= bound


def best_ever(policy, saved):
  ranked = [(r.step, oracle_score(policy, r.metrics)) for r in saved]
  ranked = [p for p in ranked if p[1] is not None]
  if not ranked:
    return None
  return next(p for p in ranked if not any(better(policy, o, p) for o in ranked if o != p))[0]


def simulate(policy, saves, seed):
  """Saves, then applies retention; returns (all saved records, steps on disk)."""
  rng = random.Random(seed)
  disk: dict[int, StepRecord] = {}
  saved = []
  best = None  # (step, score): the best ranked step saved so far
  for record, restart in saves:
    disk[record.step] = record
    saved.append(record)
    score = oracle_score(policy, record.metrics)
    if score is not None and (best is None or better(policy, (record.step, score), best)):
      best = (record.step, score)
    records = list(disk.values())
    decisions = decide_retention(policy, records)
    check_invariants(policy, records, decisions)
    # Only a function of the records: their order does not matter.
    shuffled = records[:]
    rng.shuffle(shuffled)
    assert decide_retention(policy, shuffled) == decisions

    for d in decisions:
      if not d.keep:
        del disk[d.step]
    survivors = [d for d in decisions if d.keep]

    # Stable: retention on its own kept set deletes nothing more, for the same reasons.
    assert decide_retention(policy, list(disk.values())) == survivors
    if restart:
      # A restarted trainer re-reads the records from disk (new objects, any
      # order) and rebuilds an equal policy: the same decision.
      reread = [StepRecord(r.step, time=r.time, metrics=r.metrics) for r in disk.values()]
      rng.shuffle(reread)
      assert decide_retention(dataclasses.replace(policy), reread) == survivors

    # Rules that keep "forever" did keep.
    if policy.keep_period:
      assert {r.step for r in saved if r.step % policy.keep_period == 0} <= set(disk)
    # Each round keeps the best N on disk, so the best step ever saved stays.
    if best is not None:
      assert best[0] in disk, (best, sorted(disk))
  return saved, disk


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), saves=schedules(), seed=st.integers(0, 2**16))
def test_trainer_simulation_invariants(policy, saves, seed):
  saved, disk = simulate(policy, saves, seed)
  assert max(r.step for r in saved) in disk
  # The interval chain over everything ever saved is still on disk.
  if policy.keep_time_interval_secs:
    chain = [d.step for d in decide_retention(policy, saved) if "interval" in d.reasons]
    assert set(chain) <= set(disk)
  if policy.max_to_keep is None:
    ranked_or_all = [r.step for r in saved if not policy.ranks_by_metric or oracle_score(policy, r.metrics) is not None]
    assert set(ranked_or_all) <= set(disk)
    if not policy.ranks_by_metric:
      assert set(disk) == {r.step for r in saved}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  policy=policies().filter(lambda p: p.ranks_by_metric),
  saves=schedules(),
  seed=st.integers(0, 2**16),
)
def test_global_best_survives(policy, saves, seed):
  saved, disk = simulate(policy, saves, seed)
  best = best_ever(policy, saved)
  if best is not None:
    assert best in disk
    decisions = {d.step: d for d in decide_retention(policy, list(disk.values()))}
    assert "best #1" in decisions[best].reasons
  # More: the best `max_to_keep` of everything ever saved are all on disk.
  ranked = [(r.step, oracle_score(policy, r.metrics)) for r in saved]
  ranked = [p for p in ranked if p[1] is not None]
  limit = len(ranked) if policy.max_to_keep is None else policy.max_to_keep
  top = sorted(ranked, key=lambda p: sum(better(policy, o, p) for o in ranked))[:limit]
  assert {s for s, _ in top} <= set(disk)


from kckpt import policies  # noqa: E402


def test_retention_policy_rejects_bad_settings():
  with pytest.raises(ValueError, match="max_to_keep"):
    policies.RetentionPolicy(max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    policies.RetentionPolicy(best_mode="maximize")


def test_duplicate_records_give_one_decision_per_step():
  decisions = policies.decide_retention(policies.RetentionPolicy(max_to_keep=1), [policies.StepRecord(1), policies.StepRecord(1)])
  assert [(d.step, d.reasons) for d in decisions] == [(1, ("newest", "latest"))]
