"""The local tier in one process: `Checkpointer(local_workdir=...)` with real files (kckpt._local_tier).

The multi-process parts (peer copies, agreement, another process count) are
in tests/integration/test_local_tier.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt import _local_format
from kckpt.errors import BackgroundSaveError
from tests.helpers import PYTHON, REPO, subprocess_env


def state_at(step: int) -> dict:
  return {
    "params": {"w": jnp.arange(12.0).reshape(4, 3) + step, "half": jnp.full(5, step, jnp.bfloat16)},
    "opt": {"mu": np.full(3, step, np.float32), "count": np.int64(step)},
    "step": step,
  }


def checkpointer(tmp_path, run="run", **kwargs) -> kckpt.Checkpointer:
  config = dict(save_interval_steps=10, max_to_keep=None, local_workdir=tmp_path / "local", local_save_interval_steps=2)
  return kckpt.Checkpointer(workdir=tmp_path / run, **{**config, **kwargs})


def train(ckpt: kckpt.Checkpointer, steps, make=state_at) -> None:
  for step in steps:
    ckpt.maybe_save(make(step), step=step)
  ckpt.wait_until_finished()


def assert_state(restored, step):
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(12.0).reshape(4, 3) + step)
  assert restored["params"]["half"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(restored["params"]["half"], np.float32), np.full(5, step, np.float32))
  np.testing.assert_array_equal(restored["opt"]["mu"], np.full(3, step, np.float32))
  assert restored["opt"]["count"] == step and isinstance(restored["opt"]["count"], np.int64)
  assert restored["step"] == step
  assert isinstance(restored["params"]["w"], jax.Array)


def test_local_steps_are_saved_on_their_interval_and_never_seen_by_readers_of_the_workdir(tmp_path):
  ckpt = checkpointer(tmp_path)
  train(ckpt, range(18))
  assert ckpt.all_steps == [0, 10]  # the persistent tier
  assert ckpt.local_steps == [14, 16]  # local_max_to_keep=2
  assert sorted(os.listdir(tmp_path / "local" / "process_0")) == ["ckpt_14", "ckpt_16"]
  reader = kckpt.Checkpointer.open(tmp_path / "run")
  assert reader.all_steps == [0, 10] and reader.latest_step == 10 and reader.local_steps == []
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
    "LOCAL_TIER_RUN_ID.json",  # this incarnation of the run (see the next test)
    "RETENTION.json",
    "WRITER_LOCK.json",
    "ckpt_0",
    "ckpt_10",
  ]
  out = subprocess.run([PYTHON, "-m", "kckpt", "ls", str(tmp_path / "run")], capture_output=True, text=True, env=subprocess_env())
  assert out.returncode == 0 and re.findall(r"^\s+(\d+)\s+\d{4}-", out.stdout, re.M) == ["0", "10"], out.stdout
  ckpt.close()


def test_a_resumed_run_restores_the_newest_local_step_bit_for_bit(tmp_path):
  with checkpointer(tmp_path) as first:
    train(first, range(18))
  resumed = checkpointer(tmp_path)
  restored = resumed.restore(state_at(0))
  assert_state(restored, 16)
  stats = resumed.last_restore_stats
  assert stats.step == 16 and stats.tier == "local" and stats.bytes == kckpt.trees.tree_nbytes(state_at(0))
  # Named steps and a restore with no target use the persistent tier.
  assert_state(resumed.restore(state_at(0), step=10), 10)
  assert resumed.last_restore_stats.tier == "persistent"
  assert resumed.restore()["step"] == 10
  resumed.close()


def test_a_run_started_again_in_a_deleted_workdir_never_restores_the_old_local_steps(tmp_path, caplog):
  with checkpointer(tmp_path) as first:
    train(first, range(18))  # local 14, 16
  shutil.rmtree(tmp_path / "run")  # "start over": the workdir is deleted, the node-local disk keeps its files
  again = checkpointer(tmp_path)
  assert again.local_steps == []
  initial = state_at(0)
  with caplog.at_level(logging.INFO, logger="kckpt"):
    assert again.restore(initial, noop_if_missing=True) is initial
  assert "saved before the run's workdir was started again" in caplog.text
  train(again, range(1, 4))  # local 2; the old incarnation's steps are deleted by retention
  assert again.local_steps == [2]
  assert sorted(os.listdir(tmp_path / "local" / "process_0")) == ["ckpt_2"]
  again.close()


def test_a_donated_target_is_freed_by_a_local_restore(tmp_path):
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(5))
    target = state_at(0)
    restored = ckpt.restore(target)
  assert target["params"]["w"].is_deleted() and not restored["params"]["w"].is_deleted()
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(12.0).reshape(4, 3) + 4)


def test_the_persistent_tier_is_used_when_it_is_newer_or_the_local_tier_is_gone(tmp_path, caplog):
  with checkpointer(tmp_path, local_save_interval_steps=4) as ckpt:
    train(ckpt, range(11))  # local: 4, 8; persistent: 0, 10
    assert ckpt.local_steps == [4, 8]
    with caplog.at_level(logging.INFO, logger="kckpt"):
      assert_state(ckpt.restore(state_at(0)), 10)
    assert ckpt.last_restore_stats.tier == "persistent"
    assert "the newest local step (8) is older than the persistent step 10" in caplog.text
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(11, 13))  # local 12
    assert_state(ckpt.restore(state_at(0)), 12)
    for name in os.listdir(tmp_path / "local" / "process_0"):
      (tmp_path / "local" / "process_0" / name / "STEP.json").unlink()
    assert ckpt.local_steps == []
    assert_state(ckpt.restore(state_at(0)), 10)


def test_local_steps_of_another_run_are_never_restored(tmp_path, caplog):
  with checkpointer(tmp_path, run="a") as a:
    train(a, range(5))
  other = checkpointer(tmp_path, run="b")
  assert other.local_steps == []
  initial = state_at(0)
  with caplog.at_level(logging.INFO, logger="kckpt"):
    assert other.restore(initial, noop_if_missing=True) is initial
  assert "belongs to another run" in caplog.text and "step 4" in caplog.text
  other.close()


def test_a_flipped_bit_in_a_local_file_is_found_and_the_next_step_used(tmp_path, caplog):
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(17))
  folder = tmp_path / "local" / "process_0" / "ckpt_16"
  sizes = json.loads((folder / "p0.crc.json").read_text())["parts"]
  raw = _local_format.read_parts(folder, 0, sizes)
  unpacked = _local_format.unpack(raw)
  piece = unpacked.pieces[unpacked.manifest["leaves"]["params.w"]["pieces"][0]]
  at = piece.__array_interface__["data"][0] - raw.__array_interface__["data"][0] + piece.size // 2
  assert len(sizes) == 1  # one file here (64 MiB each)
  data = folder / "p0.0.bin"
  raw[at] ^= 0x01  # one bit in the middle of params.w: same size, header and manifest intact
  raw.tofile(data)
  with caplog.at_level(logging.INFO, logger="kckpt"), checkpointer(tmp_path) as resumed:
    assert_state(resumed.restore(state_at(0)), 14)  # the newest local step that checks, still newer than 10
    assert resumed.last_restore_stats.tier == "local"
  warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warning and "local step 16" in warning[0] and "checksum mismatch in leaves ['params.w']" in warning[0], warning
  for name in ("STEP.json", "p0.crc.json"):  # with step 14 gone too: the persistent tier
    (tmp_path / "local" / "process_0" / "ckpt_14" / name).unlink()
  with checkpointer(tmp_path) as resumed:
    assert_state(resumed.restore(state_at(0)), 10)


def test_local_retention_also_keeps_the_newest_healthy_step(tmp_path):
  def make(step):
    return {"w": jnp.full(3, jnp.nan if step >= 3 else float(step))}

  with checkpointer(tmp_path, local_save_interval_steps=1, local_max_to_keep=1) as ckpt:
    train(ckpt, range(1, 6), make)
    assert ckpt.local_steps == [2, 5]  # 5 newest; 2 the newest finite one
    record = json.loads((tmp_path / "local" / "process_0" / "ckpt_5" / "STEP.json").read_text())
    assert record["healthy"] is False and record["process_count"] == 1 and record["owners"] == [0]


def test_a_failed_local_save_is_raised_naming_the_step(tmp_path):
  (tmp_path / "not_a_folder").write_text("x")
  ckpt = checkpointer(tmp_path, local_workdir=tmp_path / "not_a_folder" / "{process_index}")
  ckpt.maybe_save(state_at(2), step=2)
  with pytest.raises(BackgroundSaveError, match="local-tier save of step 2") as info:
    ckpt.maybe_save(state_at(4), step=4)
  assert info.value.step == 2
  assert ckpt.all_steps == []  # nothing persistent was due; nothing lost
  ckpt.close()


def test_bad_local_settings_are_refused_naming_the_field(tmp_path):
  with pytest.raises(ValueError, match="local_save_interval_steps"):
    kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, local_workdir=tmp_path / "l")
  with pytest.raises(ValueError, match="local_workdir must be a path on this machine"):
    kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, local_workdir="s3://bucket/x", local_save_interval_steps=1)
  with pytest.raises(ValueError, match="local_replicas"):
    kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, local_replicas=-1)
  with pytest.raises(ValueError, match="local_max_to_keep"):
    kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, local_max_to_keep=0)


def test_a_leaf_the_local_tier_cannot_hold_is_named():
  with pytest.raises(ValueError, match="'a.b'"):
    _local_format.pack({"a": {"b": object()}}, step=1, owner=0)


def test_pack_and_unpack_round_trip_every_leaf_kind():
  tree = {"x": jnp.arange(6.0).reshape(2, 3), "n": np.float16(3), "s": "text", "none": None, "k": np.arange(4, dtype=np.uint8)}
  unpacked = _local_format.unpack(_local_format.pack(tree, step=7, owner=0))
  assert unpacked.manifest["step"] == 7
  out = _local_format.assemble(unpacked, tree)
  np.testing.assert_array_equal(out["x"], np.arange(6.0).reshape(2, 3))
  assert out["n"] == np.float16(3) and out["s"] == "text" and out["none"] is None
  np.testing.assert_array_equal(out["k"], np.arange(4, dtype=np.uint8))


CRASH_PROGRAM = textwrap.dedent(
  """
  import sys, numpy as np, kckpt
  ckpt = kckpt.Checkpointer(workdir=sys.argv[1], save_interval_steps=100, local_workdir=sys.argv[2], local_save_interval_steps=2)
  state = lambda step: {"w": np.full(32 * 2**20, step, np.float32)}  # 128 MB: its write takes a while
  ckpt.maybe_save(state(2), step=2)
  ckpt.wait_until_finished()
  ckpt.maybe_save(state(4), step=4)  # returns at once; the local write goes on in the background
  print("STARTED", flush=True)
  ckpt.wait_until_finished()
  print("NOT KILLED", flush=True)
  """
)


def test_a_crash_in_the_middle_of_a_local_save_never_exposes_a_partial_step(tmp_path):
  local = tmp_path / "local"
  folder = local / "process_0"
  proc = subprocess.Popen(
    [PYTHON, "-c", CRASH_PROGRAM, str(tmp_path / "run"), str(local)],
    cwd=REPO,
    env=subprocess_env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert proc.stdout.readline().strip() == "STARTED"
    while not [n for n in os.listdir(folder) if n.startswith(".tmp-ckpt_4")]:  # the step-4 write has begun
      assert proc.poll() is None, "the program ended before its step-4 write began"
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  names = os.listdir(folder)
  assert [n for n in names if n.startswith(".tmp-ckpt_4")] and "ckpt_4" not in names, names
  ckpt = kckpt.Checkpointer(workdir=tmp_path / "run", save_interval_steps=100, local_workdir=local, local_save_interval_steps=2)
  assert ckpt.local_steps == [2]
  restored = ckpt.restore({"w": np.zeros(32 * 2**20, np.float32)})
  assert ckpt.last_restore_stats.tier == "local" and ckpt.last_restore_stats.step == 2
  np.testing.assert_array_equal(restored["w"][:: 2**20], np.full(32, 2, np.float32))
  ckpt.maybe_save({"w": np.ones(4, np.float32)}, step=6)
  ckpt.close()
  assert sorted(os.listdir(folder)) == ["ckpt_2", "ckpt_6"]  # the crash's leftover is removed by the next save


def test_after_a_rollback_the_abandoned_local_steps_are_never_restored(tmp_path, caplog):
  with checkpointer(tmp_path) as first:
    train(first, range(18))  # local 14, 16; persistent 0, 10
  rolled = checkpointer(tmp_path)
  rolled.restore()  # a look at the newest persistent step, as NumPy: hides nothing
  assert_state(rolled.restore(state_at(0)), 16)
  assert_state(rolled.restore(state_at(0), step=10), 10)  # back to 10 into a target, e.g. after a divergence
  with caplog.at_level(logging.INFO, logger="kckpt"):
    assert_state(rolled.restore(state_at(0)), 10)  # a crash before the next local save: not 16
  assert "a continuation this run abandoned" in caplog.text
  assert rolled.local_steps == []
  folder = tmp_path / "local" / "process_0"
  train(rolled, range(11, 13), lambda step: state_at(step + 100))  # the new continuation: local 12
  assert rolled.local_steps == [12]
  assert sorted(os.listdir(folder)) == ["ckpt_12"]  # 14 and 16 of the abandoned one are deleted, and the marker
  train(rolled, range(13, 17), lambda step: state_at(step + 100))  # 14 and 16 again: new folders
  rolled.close()
  with checkpointer(tmp_path) as resumed:
    assert_state(resumed.restore(state_at(0)), 116)  # the new continuation's step 16


def test_a_local_save_replaces_a_folder_in_its_way(tmp_path):
  folder = tmp_path / "local" / "process_0" / "ckpt_4"
  folder.mkdir(parents=True)
  (folder / "junk").write_text("left by something else")  # no STEP.json: not a step
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(5))
    assert ckpt.local_steps == [2, 4]
    assert not (folder / "junk").exists()
  with checkpointer(tmp_path) as resumed:
    assert_state(resumed.restore(state_at(0)), 4)


def test_delete_all_steps_clears_the_local_tier_too(tmp_path):
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(5))
    assert ckpt.local_steps == [2, 4]
    assert ckpt.delete_all_steps() == [0]
    assert ckpt.local_steps == [] and ckpt.all_steps == []
    initial = state_at(0)
    assert ckpt.restore(initial, noop_if_missing=True) is initial
    train(ckpt, range(5, 7))
  reader = checkpointer(tmp_path, create=False)
  with pytest.raises(kckpt.ReadOnlyCheckpointerError):
    reader.delete_all_steps()
  assert reader.local_steps == [6]  # a read-only Checkpointer deletes nothing


@pytest.mark.parametrize("damage", ["truncated", "manifest"])
def test_a_damaged_local_file_falls_back_instead_of_failing(tmp_path, caplog, damage):
  with checkpointer(tmp_path) as ckpt:
    train(ckpt, range(13))  # local 10, 12; persistent 0, 10
  data = tmp_path / "local" / "process_0" / "ckpt_12" / "p0.0.bin"
  raw = bytearray(data.read_bytes())
  if damage == "truncated":
    raw = raw[:10]  # shorter than the header
  else:
    at = raw.index(b'"step": 12')
    raw[at : at + 10] = b'"step": 13'  # same size; only the header's checksum sees it
  data.write_bytes(bytes(raw))
  with caplog.at_level(logging.INFO, logger="kckpt"), checkpointer(tmp_path) as resumed:
    assert_state(resumed.restore(state_at(0)), 10)  # local 10 (as new as the persistent one)
  assert resumed.last_restore_stats.tier == "local"
  expected = "another size than when it was written" if damage == "truncated" else "checksum mismatch in the header or manifest"
  assert expected in caplog.text, caplog.text
