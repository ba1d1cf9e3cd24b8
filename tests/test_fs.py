"""Local vs object-store paths, atomic writes, and the folder naming of a run."""

import os
import threading

from etils import epath

from kckpt import _fs
from kckpt import _layout


def test_local_and_object_store_paths_are_told_apart(tmp_path):
  assert _fs.is_local(tmp_path) and _fs.is_local("relative/run") and _fs.is_local(epath.Path(tmp_path))
  for remote in ("gs://bucket/run", "s3://bucket/run"):
    assert not _fs.is_local(remote) and _fs.is_object_store(remote)
  assert not _fs.is_object_store(tmp_path)


def test_relative_local_paths_are_made_absolute_and_remote_ones_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert _fs.absolute("run") == os.path.join(str(tmp_path), "run")
  assert _fs.absolute("s3://bucket/run") == "s3://bucket/run"
  assert _layout.checkpoints_dir("run") == epath.Path(tmp_path) / "run" / "checkpoints"


def test_atomic_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
  path = epath.Path(tmp_path) / "RULES.json"
  path.write_text("old")
  seen = set()
  stop = threading.Event()

  def reader():
    while not stop.is_set():
      seen.add(path.read_text())

  thread = threading.Thread(target=reader)
  thread.start()
  for i in range(200):
    _fs.write_text_atomic(path, "x" * 1000 + str(i))
  stop.set()
  thread.join()
  assert seen <= {"old"} | {"x" * 1000 + str(i) for i in range(200)}  # never a partial file
  assert sorted(os.listdir(tmp_path)) == ["RULES.json"]


def test_folder_size_counts_every_file(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 100)
  (tmp_path / "y.bin").write_bytes(b"\0" * 23)
  assert _fs.folder_size(epath.Path(tmp_path)) == 123


def test_step_folder_names():
  assert _layout.parse_step("ckpt_12") == 12
  assert [_layout.parse_step(n) for n in ("ckpt_12.orbax-checkpoint-tmp-1", "ckpt_", "ckpt_x", "other_3")] == [None] * 4
  assert _layout.step_dir(epath.Path("/runs/a/checkpoints"), 7).name == "ckpt_7"
  assert _layout.steps_repr(list(range(0, 1000, 10))) == "[0, 10, 20, 30, ... 92 more ..., 960, 970, 980, 990]"


def test_retention_rules_round_trip(tmp_path):
  checkpoints = epath.Path(tmp_path)
  assert _layout.read_retention_rules(checkpoints) is None
  _layout.write_retention_rules(checkpoints, {"max_to_keep": 2, "keep_period": None})
  assert _layout.read_retention_rules(checkpoints) == {"max_to_keep": 2, "keep_period": None}
