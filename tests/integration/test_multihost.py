"""Many hosts: real multi-process runs (JAX processes on 127.0.0.1 with gloo), real Orbax, real files.

Each cluster start costs seconds of JAX imports on two cores, so the
multi-process tests are few and each checks many things at once; the
single-process parts of preemption and coordination are tested in-process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading

import crc32c
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import kckpt
from kckpt import multihost
from tests.helpers import PYTHON, REPO, subprocess_env
from tests.multiprocess import Cluster
from tests.programs import multihost_run

PROGRAM = ["-m", "tests.programs.multihost_run"]
EXAMPLE = REPO / "examples" / "multihost.py"


# ---------------------------------------------------------------------------
# Multi-process runs
# ---------------------------------------------------------------------------


def test_sharded_run_saved_by_4_processes_restores_on_4_2_and_1(tmp_path):
  results = Cluster([*PROGRAM, "save"], num_processes=4, workdir=tmp_path).run()
  for r in results:
    assert r["saved"] == [0, 3, 6, 9, 12]  # async maybe_save, every 3 steps, on every process
    assert r["all_steps"] == [9, 12]  # retention (max_to_keep=2) after wait_until_finished
    assert r["latest_step"] == 12
    assert r["same_mesh"] is True  # every shard of every process
    assert r["other_mesh"] is True and r["other_mesh_shape"] == [2, 4]  # (4, 2) mesh -> (2, 4), other specs
    assert r["numpy"] is True
    # Time-based saving: only the primary's clock says it is due, yet every process saves the same steps.
    assert r["timed_saved"] and r["timed_saved"] == results[0]["timed_saved"] == r["timed_steps"]

  # Fewer processes: 2 processes with 2 devices each.
  for r in Cluster([*PROGRAM, "restore"], num_processes=2, workdir=tmp_path).run():
    assert r == {"processes": 2, "latest_step": 12, "all_steps": [9, 12], "restored": True, "restored_step": 12}

  # One process (this one, one device), and an eval job reading NumPy arrays.
  reader = kckpt.Checkpointer.open(tmp_path / multihost_run.RUN)
  assert reader.latest_step == 12
  mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
  assert multihost_run.check_restored(reader.restore(multihost_run.target_on(mesh, P("d"), P("d"))), 12)
  as_numpy = reader.restore(step=9)
  np.testing.assert_array_equal(as_numpy["params"]["w"], multihost_run.values(9))
  assert int(as_numpy["step"]) == 9
  # Statistics of leaves sharded over 4 processes: each reduced its own shards, the primary merged them.
  stats = kckpt.inspect.leaf_stats(reader.directory, 12)["default"]
  for name, expected in {
    "params.w": multihost_run.values(12),
    "params.v": multihost_run.values(12)[:, 0],
    "params.b": multihost_run.values(12)[0],  # replicated: counted once
  }.items():
    x = expected.astype(np.float64)
    assert stats[name]["size"] == x.size and stats[name]["nonfinite"] == 0
    assert stats[name]["norm"] == pytest.approx(np.linalg.norm(x), rel=1e-6)
    assert (stats[name]["min"], stats[name]["max"]) == (x.min(), x.max())
    assert stats[name]["mean"] == pytest.approx(x.mean(), rel=1e-6)
  assert reader.step_details(12).healthy
  assert reader.step_details(12).health["statistics_from_processes"] == 4  # every process's shards were merged
  # Checksums: each process's shards, gathered by the primary; together they tile each array exactly once.
  sums = json.loads((reader.step_details(12).path / "_KCKPT_CHECKSUMS.json").read_text())["default"]
  for name, expected in {
    "params.w": multihost_run.values(12),
    "params.v": multihost_run.values(12)[:, 0],
    "params.b": multihost_run.values(12)[0],
  }.items():
    covered = np.zeros(expected.shape, np.int32)
    assert sums[name]["shape"] == list(expected.shape) and sums[name]["dtype"] == "float32"
    for box, crc in sums[name]["shards"]:
      region = tuple(slice(lo, hi) for lo, hi in box)
      covered[region] += 1
      assert crc == crc32c.crc32c(np.ascontiguousarray(expected[region]).tobytes()), (name, box)
    assert (covered == 1).all(), name
  assert len(sums["params.w"]["shards"]) == 8  # a (4, 2) mesh of 8 devices: 8 shards


def test_background_error_on_one_process_is_raised_on_every_process(tmp_path):
  results = Cluster([*PROGRAM, "errors"], num_processes=2, workdir=tmp_path).run()
  expected = {  # the call that raised -> (failed step, the root cause named in the message)
    "maybe_save": (2, "on process 1: OSError: injected write failure on process 1"),
    "wait_until_finished": (4, "on process 0: OSError: injected rename failure on process 0"),
    "save": (6, "on process 1: OSError: injected write failure on process 1"),
    "close": (8, "on process 0: OSError: injected rename failure on process 0"),
  }
  for r in results:
    assert set(r["errors"]) == set(expected)
    for call, (step, cause) in expected.items():
      error = r["errors"][call]
      assert error["type"] == "BackgroundSaveError" and error["step"] == step, (call, error)
      assert error["message"].startswith(f"Saving step {step} ") and cause in error["message"], (call, error)
    assert r["all_steps"] == [1, 9]  # failed steps never appear; the run went on
  # The failure on process 1 was raised by the same maybe_save call on both processes.
  assert results[0]["maybe_save_calls"] == results[1]["maybe_save_calls"]
  # Each process's own error is the cause: the real one where it happened.
  assert results[1]["errors"]["maybe_save"]["cause"].startswith("OSError: injected write failure")
  assert results[0]["errors"]["close"]["cause"].startswith("OSError: injected rename failure")


def test_a_dead_process_makes_the_others_fail_instead_of_hanging(tmp_path):
  # Process 1 exits in the middle of the run (step 2 may still be saving). Process 0 must
  # raise ProcessTimeoutError at its next maybe_save (barrier_timeout_secs=3): the cluster's
  # timeout fails the test if it hangs instead.
  results = Cluster([*PROGRAM, "dies"], num_processes=2, workdir=tmp_path, timeout=90).run(expect={1: 17})
  r = results[0]
  assert r["timeout_at"] == 3 and r["processes"] == [1]
  assert r["error"].startswith("maybe_save(step=3): process(es) [1] did not get there within 3 s")


def test_sigterm_to_one_process_preempts_the_run_which_resumes(tmp_path):
  env = subprocess_env()
  args = lambda workdir, n: [
    PYTHON,
    str(EXAMPLE),
    "--processes",
    str(n),
    "--workdir",
    str(workdir),
    "--steps",
    "60",
    "--save-every",
    "1000",
  ]  # only preemption saves mid-run
  # The reference: one process, uninterrupted.
  reference = subprocess.run(args(tmp_path / "ref", 1), env=env, capture_output=True, text=True, timeout=120)
  assert reference.returncode == 0, reference.stdout + reference.stderr

  # Two processes; SIGTERM to process 1 only, once it is training.
  run = tmp_path / "run"
  proc = subprocess.Popen(
    args(run, 2) + ["--step-delay", "0.05"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  watchdog = threading.Timer(120, proc.kill)
  watchdog.start()
  pids, lines = {}, []
  try:
    for line in proc.stdout:
      lines.append(line)
      if match := re.match(r"\[launcher\] started process (\d) \(pid (\d+)\)", line):
        pids[int(match.group(1))] = int(match.group(2))
      if line.startswith("[p1] step 10") and "sigterm" not in pids:
        os.kill(pids[1], signal.SIGTERM)
        pids["sigterm"] = True
    code = proc.wait()
  finally:
    watchdog.cancel()
  out = "".join(lines)
  assert code == 143, out  # the launcher reports a preemption
  preempted = dict(re.findall(r"\[p(\d)\] preempted: step (\d+) is saved", out))
  assert set(preempted) == {"0", "1"} and len(set(preempted.values())) == 1, out  # the same step everywhere
  step = int(preempted["0"])
  assert 10 < step < 60, out
  assert kckpt.Checkpointer.open(run).all_steps == [step]  # saved off the interval, durably

  # The same command resumes from that step and ends bit-identical to the reference.
  resumed = subprocess.run(args(run, 2), env=env, capture_output=True, text=True, timeout=120)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"[p0] resumed from step {step}" in resumed.stdout and f"[p1] resumed from step {step}" in resumed.stdout
  result = lambda w: json.loads((w / "result.json").read_text())
  assert result(run)["params_sha256"] == result(tmp_path / "ref")["params_sha256"]


def test_reads_on_process_0_alone_are_local_and_restores_agree(tmp_path):
  # Regression: only process 0 logged `latest_step`, `all_steps`, `should_save(step + 1)` in
  # the loop, and process 1 raised ProcessTimeoutError at maybe_save(step=2): a read was a
  # hidden collective. Here process 0 calls every read at every step (saves in flight) and
  # process 1 none; barrier_timeout_secs=10 makes such a collective fail fast, not hang.
  results = Cluster([*PROGRAM, "local-reads"], num_processes=2, workdir=tmp_path, timeout=90).run()
  p0, p1 = results
  assert "reads" not in p1  # process 1 never read
  # Every process saved the same steps: the step interval, the tag's step, and step 5 by the
  # time rule on the primary's clock (it slept past save_interval_secs after step 4).
  assert p0["saved"] == p1["saved"]
  assert {0, 2, 4, 5, 6, 8} <= set(p0["saved"])

  reads = {row["step"]: row for row in p0["reads"]}
  assert sorted(reads) == list(range(multihost_run.LOCAL_READS_STEPS))  # no read raised
  assert reads[multihost_run.LOCAL_READS_TAGGED]["should_save_next"] is True  # the time rule, judged locally
  assert reads[0]["should_save_next"] is False and reads[2]["should_save_next"] is False
  assert reads[1]["should_save_next"] is True  # step 2: the step interval
  for row in p0["reads"]:
    assert row["all_steps"] == sorted(row["all_steps"]) and set(row["all_steps"]) <= set(p0["saved"])
    assert row["latest_step"] == (row["all_steps"][-1] if row["all_steps"] else None)
    assert {s for s, _ in row["retention"]} <= set(p0["saved"])
    if row["latest_step"] is not None:
      assert row["metrics"] == {"loss": multihost_run.local_reads_loss(row["details_step"])}
      assert row["details_step"] >= row["latest_step"]  # -1: the newest, listed again
      assert row["details_tag"] == (multihost_run.LOCAL_READS_TAG if row["details_step"] == 4 else None)
  assert reads[8]["best_step"] in (None, 2)  # step 2 (loss 1) once listed
  assert any(row["best_step"] == 2 for row in p0["reads"])

  # After the loop: every process restored the same steps, with the same values.
  assert p0["restored"] == p1["restored"]
  expected = {"-1": 8, "best": 2, multihost_run.LOCAL_READS_TAG: multihost_run.LOCAL_READS_TAGGED}
  for name, step in expected.items():
    assert p0["restored"][name] == {"step": step, "step_leaf": step, "w00": float(step), "matches": True}, name
  assert kckpt.Checkpointer.open(tmp_path / "local_reads").all_steps == [2, 4, 8]  # the best 3 (min loss) + newest


# ---------------------------------------------------------------------------
# In one process
# ---------------------------------------------------------------------------


def test_request_preemption_saves_the_current_step_and_stops(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=10, handle_sigterm=False)
  state = lambda s: {"w": np.full(3, float(s))}
  assert ckpt.maybe_save(state(10), step=10)
  assert not ckpt.maybe_save(state(11), step=11)
  assert not ckpt.reached_preemption
  ckpt.request_preemption()
  assert ckpt.maybe_save(state(12), step=12)  # off the interval
  assert ckpt.reached_preemption
  assert kckpt.Checkpointer.open(workdir).all_steps == [10, 12]  # durable when maybe_save returned
  assert not ckpt.maybe_save(state(20), step=20)  # nothing more once preempted
  ckpt.close()
  resumed = kckpt.Checkpointer(workdir=workdir, save_interval_steps=10)
  assert resumed.restore({"w": np.zeros(3)})["w"].tolist() == [12.0] * 3
  assert not resumed.reached_preemption


def test_sigterm_is_a_preemption_notice_until_close(workdir):
  # In a fresh process: a SIGTERM to the pytest process would outlive this test.
  proc = subprocess.run(
    [PYTHON, "-m", "tests.programs.sigterm_single", str(workdir)],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
  assert result == {
    "installed": True,  # by the first maybe_save
    "stopped_at": 4,
    "saved": [4],
    "durable": [4],  # the next maybe_save saved step 4, off the interval, durably
    "restored": True,  # close() gave SIGTERM its previous handler back
    "forgotten": True,
  }


def test_without_handle_sigterm_the_handler_is_left_alone(workdir):
  before = signal.getsignal(signal.SIGTERM)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, handle_sigterm=False)
  ckpt.maybe_save({"w": np.ones(2)}, step=1)
  assert signal.getsignal(signal.SIGTERM) is before
  ckpt.close()


def test_coordination_in_one_process_is_local():
  assert multihost.vote(multihost.StepVote(preempt=True, time_due=True), timeout_secs=1, what="x") == (
    multihost.StepVote(preempt=True, time_due=True)
  )
  assert multihost.agree(True) is True and multihost.agree(False) is False
  assert multihost.primary_value(7, what="x") == 7
  assert multihost.exchange("t", {"a": 1}, timeout_secs=1, what="x") == {0: {"a": 1}}
  multihost.barrier("t", timeout_secs=1, what="x")  # nothing to wait for


def test_failures_are_described_by_their_cause():
  text = multihost.describe_failures({0: "PeerSaveError: stopped saving step 2: ...", 1: "OSError: disk full"})
  assert text == "on process 1: OSError: disk full (process 0 stopped saving it)"
  assert multihost.describe_failures({0: "OSError: a", 2: "OSError: b"}) == "on process 0: OSError: a; on process 2: OSError: b"


@pytest.mark.parametrize("bad", [0, -1, True, "10"])
def test_barrier_timeout_must_be_positive(bad):
  with pytest.raises(ValueError, match="barrier_timeout_secs"):
    kckpt.Checkpointer(workdir=None, save_interval_steps=1, barrier_timeout_secs=bad)


def _sigterm_loop(workdir, mode, kill_step=12):
  proc = subprocess.run(
    [PYTHON, "-m", "tests.programs.sigterm_loop", str(workdir), mode, str(kill_step)],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  trained = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("STEP ")]
  return proc, trained, kckpt.Checkpointer.open(workdir).all_steps


def test_a_loop_that_ignores_reached_preemption_still_ends_with_status_143(workdir):
  proc, trained, steps = _sigterm_loop(workdir, "default")
  assert proc.returncode == 143, proc.stdout + proc.stderr
  assert steps == [0, 10, 13]  # the preemption save at the first maybe_save after SIGTERM, durable
  assert trained[-1] == 14  # and the next maybe_save ended the run
  assert "FINALLY" in proc.stdout  # as SystemExit: finally blocks and context managers run


def test_a_handler_installed_before_kckpt_is_called_once_the_step_is_saved(workdir):
  proc, trained, steps = _sigterm_loop(workdir, "handler")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.splitlines()
  assert lines.count(f"HANDLER {int(signal.SIGTERM)}") == 1
  assert lines.index(f"HANDLER {int(signal.SIGTERM)}") == lines.index("STEP 13") + 1  # after the save of step 13
  assert steps == [0, 10, 13] and trained[-1] == 59  # its handler chose to go on; kckpt saves nothing more


def test_an_ignored_sigterm_stays_ignored_after_the_preemption_save(workdir):
  proc, trained, steps = _sigterm_loop(workdir, "ignored")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert steps == [0, 10, 13] and trained[-1] == 59


@pytest.mark.parametrize("mode, status", [("default", 143), ("handler", 0), ("ignored", 0)])
def test_a_sigterm_after_the_last_maybe_save_is_honoured_at_close(workdir, mode, status):
  # Before: close() restored the earlier handler and dropped the SIGTERM (exit 0, no handler call).
  proc, trained, steps = _sigterm_loop(workdir, mode, kill_step=59)
  assert proc.returncode == status, proc.stdout + proc.stderr
  assert trained[-1] == 59 and steps == [30, 40, 50]  # the saves were finished first (max_to_keep=3)
  lines = proc.stdout.splitlines()
  assert lines.count(f"HANDLER {int(signal.SIGTERM)}") == (1 if mode == "handler" else 0)
  if mode == "handler":
    assert lines.index(f"HANDLER {int(signal.SIGTERM)}") > lines.index("FINALLY")  # called by close, after the saves


def test_sigterm_to_one_process_of_a_loop_that_never_checks_ends_every_process_with_143(tmp_path):
  # Before: SIGTERM was swallowed; then the signalled process alone ended and the others
  # waited for it until barrier_timeout_secs.
  results = Cluster([*PROGRAM, "sigterm-no-check"], num_processes=2, workdir=tmp_path, timeout=90).run(expect={0: 143, 1: 143})
  assert [r["trained"][-1] for r in results] == [14, 14]  # saved 13 for the preemption, ended at the next call
  assert kckpt.Checkpointer.open(tmp_path / "sigterm").all_steps == [0, 10, 13]
