"""Tests of kckpt.watch.new_steps with a fake clock: no disk, no real sleeping."""

from __future__ import annotations

import itertools

import pytest

from kckpt import watch


class FakeRun:
  """A run whose steps appear as time passes: `sleep` advances a fake clock.

  `events` maps a time to the steps that appear then (or "done" for the end
  marker). Sleeping past a time applies its events.
  """

  def __init__(self, steps=(), events=None, max_time=10_000.0):
    self.steps = sorted(steps)
    self.events = sorted((events or {}).items())
    self.now = 0.0
    self.done = False
    self.sleeps = []
    self.listings = 0
    self.max_time = max_time
    self.yield_times = []

  def clock(self):
    return self.now

  def sleep(self, secs):
    assert secs >= 0, secs
    self.sleeps.append(secs)
    self.advance(secs)

  def advance(self, secs):
    self.now += secs
    if self.now > self.max_time:
      raise AssertionError(f"the watcher is still waiting at t={self.now}")
    while self.events and self.events[0][0] <= self.now:
      _, what = self.events.pop(0)
      self.apply(what)

  def apply(self, what):
    for item in what:
      if item == "done":
        self.done = True
      else:
        self.steps = sorted({*self.steps, item})

  def list_steps(self):
    self.listings += 1
    return list(self.steps)

  def timeout_fn(self):
    return self.done

  def watch(self, **kwargs):
    kwargs.setdefault("sleep", self.sleep)
    kwargs.setdefault("clock", self.clock)
    for step in watch.new_steps(self.list_steps, **kwargs):
      self.yield_times.append(self.now)
      yield step

  def collect(self, **kwargs):
    return list(self.watch(**kwargs))


def test_yields_every_new_step_in_order():
  run = FakeRun(events={1.0: [10], 3.0: [20, 30], 5.0: [40], 6.0: [50, 60, 70]})
  assert run.collect(timeout=10.0) == [10, 20, 30, 40, 50, 60, 70]
  assert run.yield_times == [1.0, 3.0, 3.0, 5.0, 6.0, 6.0, 6.0]


def test_polls_every_poll_interval_while_idle():
  run = FakeRun(events={10.0: [1]})
  gen = run.watch(after=0, poll_interval_secs=2.5)
  assert next(gen) == 1
  assert run.sleeps == [2.5, 2.5, 2.5, 2.5]
  assert run.now == 10.0


def test_no_sleep_between_steps_found_together():
  run = FakeRun(steps=[1, 2, 3])
  assert list(itertools.islice(run.watch(after=0), 3)) == [1, 2, 3]
  assert run.sleeps == []


def test_starts_from_newest_existing_step_when_after_is_none():
  run = FakeRun(steps=[1, 2, 3], events={2.0: [4], 4.0: [5, 6]})
  assert run.collect(timeout=5.0) == [3, 4, 5, 6]
  assert run.yield_times == [0.0, 2.0, 4.0, 4.0]


def test_starts_from_newest_existing_sparse_steps():
  run = FakeRun(steps=[100, 200, 300])
  assert run.collect(timeout=1.0) == [300]


def test_after_none_with_no_steps_yields_the_first_that_appears():
  run = FakeRun(events={2.0: [0], 3.0: [5]})
  assert run.collect(timeout=5.0) == [0, 5]


def test_after_none_existing_step_zero():
  run = FakeRun(steps=[0])
  assert run.collect(timeout=1.0) == [0]


@pytest.mark.parametrize(
  "after, expected",
  [(0, [1, 2, 3, 4, 7]), (2, [3, 4, 7]), (4, [7]), (5, [7]), (7, []), (100, []), (-1, [0, 1, 2, 3, 4, 7])],
)
def test_after(after, expected):
  run = FakeRun(steps=[0, 1, 2, 3, 4], events={3.0: [7]})
  assert run.collect(after=after, timeout=5.0) == expected


def test_only_newest_skips_intermediate_steps():
  run = FakeRun(events={1.0: [1, 2, 3], 2.0: [4], 3.0: [5, 6]})
  assert run.collect(after=0, only_newest=True, timeout=5.0) == [3, 4, 6]


def test_only_newest_skips_steps_written_while_the_consumer_works():
  run = FakeRun(steps=[1], events={1.0: [2], 2.0: [3], 3.0: [4]})
  got = []
  for step in run.watch(after=0, only_newest=True, timeout=5.0):
    got.append(step)
    if step == 1:
      run.advance(3.5)  # a slow evaluation: 2, 3 and 4 appear meanwhile
  assert got == [1, 4]


def test_every_step_without_only_newest_even_with_a_slow_consumer():
  run = FakeRun(steps=[1], events={1.0: [2], 2.0: [3], 3.0: [4]})
  got = []
  for step in run.watch(after=0, timeout=5.0):
    got.append(step)
    if step == 1:
      run.advance(3.5)
  assert got == [1, 2, 3, 4]


def test_min_interval_secs_spaces_yields():
  run = FakeRun(steps=[1, 2, 3], events={4.0: [4]})
  assert run.collect(after=0, min_interval_secs=10.0, timeout=30.0) == [1, 2, 3, 4]
  assert run.yield_times == [0.0, 10.0, 20.0, 30.0]


def test_min_interval_secs_counts_the_consumer_time():
  run = FakeRun(steps=[1, 2, 3])
  gen = run.watch(after=0, min_interval_secs=10.0)
  assert next(gen) == 1
  run.advance(4.0)  # the consumer worked 4 s: only 6 s more to wait
  assert next(gen) == 2
  assert run.now == 10.0
  run.advance(15.0)  # longer than the interval: no wait at all
  n_sleeps = len(run.sleeps)
  assert next(gen) == 3
  assert run.now == 25.0
  assert len(run.sleeps) == n_sleeps


def test_min_interval_secs_does_not_delay_the_first_step():
  run = FakeRun(steps=[1])
  gen = run.watch(after=0, min_interval_secs=100.0)
  assert next(gen) == 1
  assert run.now == 0.0


def test_min_interval_with_only_newest():
  run = FakeRun(events={1.0: [1], 2.0: [2, 3], 14.0: [4, 5]})
  assert run.collect(after=0, only_newest=True, min_interval_secs=5.0, timeout=10.0) == [1, 3, 5]
  assert run.yield_times == [1.0, 6.0, 14.0]


def test_timeout_without_any_step():
  run = FakeRun()
  assert run.collect(after=0, timeout=5.0) == []
  assert 5.0 <= run.now < 6.0


def test_timeout_counts_from_the_last_new_step():
  run = FakeRun(events={4.0: [1], 8.0: [2]})
  assert run.collect(after=0, timeout=5.0) == [1, 2]
  assert 13.0 <= run.now < 14.0


def test_timeout_is_not_hit_by_a_slow_consumer():
  # The time the consumer spends on a step does not count towards the timeout.
  run = FakeRun(steps=[1], events={8.0: [2]})
  got = []
  for step in run.watch(after=0, timeout=5.0):
    got.append(step)
    if step == 1:
      run.advance(6.0)  # longer than the timeout
  assert got == [1, 2]
  assert 13.0 <= run.now < 14.0


def test_zero_timeout_lists_once():
  run = FakeRun(steps=[1, 2])
  assert run.collect(after=0, timeout=0.0) == [1, 2]
  assert run.sleeps == []


def test_no_timeout_keeps_waiting():
  run = FakeRun(events={500.0: [1], 5000.0: [2]})
  assert list(itertools.islice(run.watch(after=0, poll_interval_secs=10.0), 2)) == [1, 2]
  assert run.now == 5000.0


def test_timeout_fn_ends_the_loop():
  run = FakeRun(events={1.0: [1], 2.0: [2], 3.0: ["done"]})
  assert run.collect(after=0, timeout_fn=run.timeout_fn) == [1, 2]
  assert run.now == 3.0


def test_timeout_fn_true_from_the_start_still_yields_existing_steps():
  run = FakeRun(steps=[1, 2])
  run.done = True
  assert run.collect(after=0, timeout_fn=run.timeout_fn) == [1, 2]
  assert run.sleeps == []


def test_step_appearing_with_the_end_marker_is_yielded():
  run = FakeRun(events={1.0: [1], 2.0: [2, "done"]})
  assert run.collect(after=0, timeout_fn=run.timeout_fn) == [1, 2]


@pytest.mark.parametrize("timeout", [None, 3.0])
def test_step_written_between_listing_and_end_marker_check(timeout):
  """The trainer writes its last step then its end marker after the watcher
  listed and before it checks the marker: the watcher lists once more."""
  run = FakeRun(events={1.0: [1]})

  def timeout_fn():
    if run.now >= 5.0 and not run.done:
      run.apply([9, "done"])
    return run.done

  assert run.collect(after=0, timeout=timeout, timeout_fn=timeout_fn) == [1, 9]
  assert run.done


def test_timeout_waits_past_the_timeout_until_timeout_fn_is_true():
  run = FakeRun(events={1.0: [1], 10.0: [2], 20.0: ["done"]})
  assert run.collect(after=0, timeout=2.0, timeout_fn=run.timeout_fn) == [1, 2]
  assert run.yield_times == [1.0, 10.0]
  assert run.now == 20.0


def test_timeout_fn_true_waits_for_the_timeout():
  run = FakeRun(events={3.0: [1]})
  run.done = True
  assert run.collect(after=0, timeout=10.0, timeout_fn=run.timeout_fn) == [1]
  assert 13.0 <= run.now < 14.0


def test_timeout_fn_not_consulted_before_the_timeout():
  calls = []
  run = FakeRun(events={1.0: [1]})

  def timeout_fn():
    calls.append(run.now)
    return True

  assert run.collect(after=0, timeout=4.0, timeout_fn=timeout_fn) == [1]
  assert calls and min(calls) >= 5.0


def test_only_newest_after_waiting_the_interval_takes_the_freshest_step():
  # One step per second; with a 5 s interval the second yield is the newest at t=5 (not step 2, seen at t=2).
  run = FakeRun(steps=[1], events={float(t): [t] for t in range(2, 30)})
  gen = run.watch(after=0, only_newest=True, min_interval_secs=5.0, timeout=60.0)
  first, second = next(gen), next(gen)
  assert (first, second) == (1, 5)
  assert run.yield_times == [0.0, 5.0]
