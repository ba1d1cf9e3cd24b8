"""The local tier across processes: real `jax.distributed` processes on 127.0.0.1 (gloo), real files.

One training run of 2 processes (the persistent tier every 10 steps, the
local tier every 2, one peer copy each) ends right after step 17 as a crash
would; then resumes by new clusters check where `restore()` takes the state
from, and that every shard on every process is bit-identical to what was saved.
"""

from __future__ import annotations

import shutil

import kckpt
from tests.multiprocess import Cluster

PROGRAM = ["-m", "tests.programs.local_tier_run"]


def resume(tmp_path, num_processes=2, devices_per_process=2) -> list[dict]:
  cluster = Cluster([*PROGRAM, "resume"], num_processes=num_processes, devices_per_process=devices_per_process, workdir=tmp_path)
  results = cluster.run()
  for i, r in enumerate(results):
    r["log"] = cluster.log(i)
  return results


def test_resume_takes_the_local_tier_then_a_peer_copy_then_the_persistent_tier(tmp_path):
  trained = Cluster([*PROGRAM, "train"], num_processes=2, workdir=tmp_path).run()
  for r in trained:
    assert r["all_steps"] == [0, 10]  # readers of the workdir see the persistent tier only
    assert r["local_steps"] == [14, 16]
    assert r["folders"] == ["host0", "host1"]
  host = {p: tmp_path / "local" / f"host{p}" for p in (0, 1)}
  for p in (0, 1):  # each folder holds its own shards and the previous process's copy
    assert sorted(f.name for f in (host[p] / "ckpt_16").glob("p*.bin")) == ["p0.0.bin", "p1.0.bin"]

  for r in resume(tmp_path):  # every local folder there
    assert (r["step"], r["tier"], r["exact"]) == (16, "local", True), r["log"]

  # Another process count: the local steps were cut for 2 processes.
  (single,) = resume(tmp_path, num_processes=1, devices_per_process=4)
  assert (single["step"], single["tier"], single["exact"]) == (10, "persistent", True), single["log"]
  assert "it was saved by 2 processes, this run has 1" in single["log"]

  shutil.rmtree(host[1])  # a lost host: process 1's shards of step 16 are still in process 0's folder
  for r in resume(tmp_path):
    assert (r["step"], r["tier"], r["exact"]) == (16, "local", True), r["log"]

  shutil.rmtree(tmp_path / "local")  # every local disk lost
  for r in resume(tmp_path):
    assert (r["step"], r["tier"], r["exact"]) == (10, "persistent", True), r["log"]
    assert "no local step of this run" in r["log"]


def test_four_processes_restore_a_lost_host_from_its_peer(tmp_path):
  trained = Cluster([*PROGRAM, "train"], num_processes=4, devices_per_process=1, workdir=tmp_path).run()
  assert all(r["local_steps"] == [14, 16] for r in trained)
  # Process 2's copy went to process 3 (the next one); sending it back is a shift of -1, not +1.
  assert sorted(f.name for f in (tmp_path / "local" / "host3" / "ckpt_16").glob("*.bin")) == ["p2.0.bin", "p3.0.bin"]
  shutil.rmtree(tmp_path / "local" / "host2")
  for r in resume(tmp_path, num_processes=4, devices_per_process=1):
    assert (r["step"], r["tier"], r["exact"]) == (16, "local", True), r["log"]
  shutil.rmtree(tmp_path / "local")  # every local disk lost
  for r in resume(tmp_path, num_processes=4, devices_per_process=1):
    assert (r["step"], r["tier"], r["exact"]) == (10, "persistent", True), r["log"]


def test_one_process_killed_after_step_17_resumes_from_its_local_tier(tmp_path):
  (trained,) = Cluster([*PROGRAM, "train"], num_processes=1, devices_per_process=4, workdir=tmp_path).run()
  assert (trained["all_steps"], trained["local_steps"]) == ([0, 10], [14, 16])
  (r,) = resume(tmp_path, num_processes=1, devices_per_process=4)
  assert (r["step"], r["tier"], r["exact"]) == (16, "local", True), r["log"]
  shutil.rmtree(tmp_path / "local")
  (r,) = resume(tmp_path, num_processes=1, devices_per_process=4)
  assert (r["step"], r["tier"], r["exact"]) == (10, "persistent", True), r["log"]


def test_a_crash_with_a_copy_to_peers_in_flight_never_exposes_its_step(tmp_path):
  for r in Cluster([*PROGRAM, "crash_mid_copy"], num_processes=2, workdir=tmp_path).run():
    assert r["dispatched"] < r["chunks"], r  # step 18's copy was part-way when the processes ended
  assert not list((tmp_path / "local").glob("host*/ckpt_18"))
  for r in resume(tmp_path):  # the newest complete local step, on every process
    assert (r["step"], r["tier"], r["exact"]) == (16, "local", True), r["log"]


def test_a_local_save_failing_on_one_process_is_raised_on_every_process(tmp_path):
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "host1").write_text("a file where process 1's folder should be")
  for r in Cluster([*PROGRAM, "fails"], num_processes=2, workdir=tmp_path).run():
    caught = r["caught"]
    assert caught is not None and caught["error_step"] == 2 and caught["step_at_raise"] == 4, caught
    assert "process 1" in caught["message"] and "local-tier save of step 2" in caught["message"], caught


def test_the_copy_to_peers_goes_on_over_the_next_calls_and_is_finished_at_exit(tmp_path):
  trained = Cluster([*PROGRAM, "exit"], num_processes=2, workdir=tmp_path).run()  # a plain exit, no close()
  for r in trained:
    (after_8,) = [p for p in r["progress"] if p["step"] == 8]
    # The call that saved step 8 only dispatched the first chunks: the rest move at later calls.
    assert after_8["dispatched"] == r["in_flight"] < after_8["chunks"], r["progress"]
    (after_9,) = [p for p in r["progress"] if p["step"] == 9]
    assert after_8["dispatched"] <= after_9["dispatched"] <= after_9["chunks"], r["progress"]
  # The exit finished both tiers' saves of step 10 (the local tier's made before Python shut its thread pools).
  assert kckpt.Checkpointer.open(tmp_path / "run").all_steps == [0, 10]
  for p, peer in ((0, 1), (1, 0)):  # each folder holds its peer's files, unchanged
    copy, original = (tmp_path / "local" / f"host{q}" / "ckpt_10" / f"p{peer}.0.bin" for q in (p, peer))
    assert copy.read_bytes() == original.read_bytes()
  shutil.rmtree(tmp_path / "local" / "host0")
  for r in resume(tmp_path):  # process 0's shards of step 10 come back from process 1's copy
    assert (r["step"], r["tier"], r["exact"]) == (10, "local", True), r["log"]


def test_a_chunk_one_process_cannot_place_fails_the_save_on_every_process_and_commits_nothing(tmp_path):
  # Process 1 sends zeros for chunk 5 of step 2's copy (flagged): process 0 must not keep them as process 1's shards.
  for r in Cluster([*PROGRAM, "zeros"], num_processes=2, workdir=tmp_path).run():
    caught = r["caught"]
    assert caught is not None and caught["error_step"] == 2 and caught["step_at_raise"] == 4, caught
    assert "process 1 sent zeros for chunk 5" in caught["message"] and "injected" in caught["message"], caught
    assert 2 not in r["local_steps"]
  assert not list((tmp_path / "local").glob("host*/ckpt_2"))


def test_a_peer_that_dies_with_a_copy_in_flight_does_not_hang_the_others(tmp_path):
  # Process 1 ends (as a crash) right after the local save of step 2 started: process 0 raises within its 5 s timeout.
  survivor, _ = Cluster([*PROGRAM, "peer_dies"], num_processes=2, workdir=tmp_path).run()
  assert survivor["caught"] is not None and "[1] did not get there within 5 s" in survivor["caught"], survivor
