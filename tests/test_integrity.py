"""Integrity: checksums of array data, and the provenance recorded in each step."""

from __future__ import annotations

import gc
import inspect
import json
import os
import platform
import socket
import subprocess
from importlib import metadata as importlib_metadata

import crc32c
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

import kckpt
from kckpt import cli
from kckpt import errors
from tests.helpers import PYTHON, HtmlTable, subprocess_env


def train_state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "params": {"dense": {"w": jnp.asarray(rng.standard_normal((256, 512), np.float32)), "b": jnp.zeros(512)}},
    "opt": {"mu": jnp.asarray(rng.standard_normal((256, 512), np.float32) * 1e-3), "count": np.int32(seed)},
  }


def flip_bit_in_the_middle_of_the_largest_data_file(step_path) -> str:
  """Flips one bit half way into the step's largest file (same size, same framing); returns the file."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_path) for f in names]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)[0]
    f.seek(size // 2)
    f.write(bytes([byte ^ 0x08]))
  assert os.path.getsize(largest) == size
  return largest


def codecs_of(item_dir, name: str) -> list[str]:
  """The Zarr v3 codec chain of array `name` in an OCDBT item, as TensorStore reads it."""
  array = ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{item_dir}/"}, "path": name}).result()
  return [c["name"] for c in array.spec().to_json()["metadata"]["codecs"]]


def zarr2_compressor_of(item_dir, name: str) -> object:
  """The Zarr v2 compressor of array `name` in an OCDBT item (None: raw bytes, as Orbax writes them uncompressed)."""
  array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{item_dir}/"}, "path": name}).result()
  return array.spec().to_json()["metadata"]["compressor"]


def test_a_flipped_bit_is_found_by_verify_and_refused_by_restore(workdir, capsys):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  for step in (1, 2, 3):
    ckpt.save(train_state(step), step=step)
  ckpt.wait_until_finished()
  assert all(ckpt.step_details(s).checksums == "crc32c-shards" for s in (1, 2, 3))
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(2).path)

  status = cli.main(["verify", str(workdir)])
  out = capsys.readouterr().out
  assert status == 1
  assert "step 1: ok" in out and "step 3: ok" in out
  assert "step 2: 1 problem" in out
  problem = next(line for line in out.splitlines() if line.startswith("PROBLEM"))
  assert "step 2, item default, leaf " in problem and "checksum mismatch" in problem
  leaf = problem.split(", leaf ", 1)[1].split(":", 1)[0]
  assert leaf in {"params.dense.w", "params.dense.b", "opt.mu", "opt.count"}
  # `kckpt diff` reads arrays through the same checks: the damaged step is an error naming the leaf, not a difference.
  assert cli.main(["diff", f"{workdir}@1", "@2"]) == cli.EXIT_ERROR
  err = capsys.readouterr().err
  assert "checksum mismatch" in err and f"leaf {leaf} of item default" in err and "ckpt_2" in err
  assert "CRC32C saved 0x" in err and ", read 0x" in err  # the message is not cut before its end
  assert cli.main(["diff", f"{workdir}@1", "@3"]) == cli.EXIT_FOUND  # intact steps still compare
  capsys.readouterr()

  with pytest.raises(errors.CheckpointReadError, match=r"step 2.*checksum mismatch") as raised:
    ckpt.restore(train_state(0), step=2)
  assert f"unreadable leaves [{leaf!r}]" in str(raised.value)  # the leaf verify named
  # The other steps are intact and restore bit for bit.
  for step in (1, 3):
    out = ckpt.restore(train_state(0), step=step)
    np.testing.assert_array_equal(out["params"]["dense"]["w"], train_state(step)["params"]["dense"]["w"])
  ckpt.close()


def flip_bit_in_the_data_of(item_dir, leaf: str) -> None:
  """Flips one bit half way into the stored bytes of `leaf` (an uncompressed OCDBT item; same size, same framing)."""
  kvstore = ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
  nodes = [(ts.ocdbt.dump(kvstore).result()["versions"][-1]["root"]["location"], b"")]
  while nodes:
    location, prefix = nodes.pop()
    for entry in ts.ocdbt.dump(kvstore, location).result()["entries"]:
      if str(entry.get("location", "")).startswith("btreenode:"):
        nodes.append((entry["location"], prefix + entry.get("subtree_common_prefix", b"")))
        continue
      key = prefix + entry["key"]
      if key.startswith(f"{leaf}/".encode()) and "indirect_value" in entry:  # a chunk (the .zarray is inline)
        folder, _, reference = entry["indirect_value"][len("value:") :].partition(":")
        path, offset, length = reference.rsplit(":", 2)
        with open(os.path.join(item_dir, folder + path), "r+b") as f:
          f.seek(int(offset) + int(length) // 2)
          byte = f.read(1)[0]
          f.seek(int(offset) + int(length) // 2)
          f.write(bytes([byte ^ 0x08]))
        return
  raise AssertionError(f"no stored chunk of {leaf} in {item_dir}")


def _reads_left_running() -> list[str]:
  """Orbax's and kckpt's array and shard read coroutines that are suspended now (a read abandoned unfinished)."""
  names = {"_read_array_index_and_device_put", "async_deserialize", "_async_deserialize", "_read_shard", "read_shard"}
  return [
    o.cr_code.co_name
    for o in gc.get_objects()
    if inspect.iscoroutine(o) and o.cr_code.co_name in names and inspect.getcoroutinestate(o) == inspect.CORO_SUSPENDED
  ]


def test_a_restore_that_fails_leaves_no_read_running_and_prints_nothing(workdir, capfd):
  """Orbax closes its loop at the first array that fails: the reads of the others went on, then printed tracebacks."""
  rng = np.random.default_rng(0)
  state = {f"layer{i:02d}": {"w": jnp.asarray(rng.standard_normal((256, 512), np.float32))} for i in range(40)}
  # 4 MB read at once: when the first array read fails, most others wait their turn.
  storage = kckpt.StorageOptions(restore_concurrent_gb=0.004)
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False, storage=storage) as ckpt:
    ckpt.save(state, step=1)
    flip_bit_in_the_data_of(ckpt.step_details(1).path / "default", "layer00.w")
    gc.collect()  # (garbage of earlier tests)
    gc.disable()  # an abandoned read is garbage once its loop is closed: keep it to be seen
    try:
      for attempt in (
        lambda: ckpt.restore(state, step=1, donate=False),
        lambda: ckpt.restore(jax.tree.map(jnp.copy, state), step=1, donate=True),
        lambda: ckpt.restore(step=1),
      ):
        with pytest.raises(
          errors.CheckpointReadError, match=r"layer00\.w.*checksum mismatch|checksum mismatch.*leaf layer00\.w "
        ):
          attempt()
        assert not _reads_left_running()
    finally:
      gc.enable()
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Exception ignored" not in err, err[-3000:]


def test_a_flipped_bit_in_a_numpy_leaf_is_refused_by_restore_verify_export_and_the_partial_loader(workdir, tmp_path, capsys):
  """NumPy leaves are checksummed on the caller's thread at save; every kckpt reader checks them."""
  rng = np.random.default_rng(0)
  state = {"big": rng.standard_normal(1 << 18).astype(np.float32), "w": jnp.arange(4.0)}  # 1 MiB of NumPy, 16 B of JAX
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  ckpt.save(state, step=1)
  ckpt.wait_until_finished()
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)

  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*unreadable leaves \['big'\].*checksum mismatch"):
    ckpt.restore({"big": np.zeros_like(state["big"]), "w": jnp.zeros(4)}, step=1)
  with pytest.raises(errors.CheckpointReadError, match="checksum mismatch"):
    ckpt.restore(step=1)  # no target: arrays as saved
  assert cli.main(["verify", str(workdir)]) == 1
  assert "leaf big: " in capsys.readouterr().out
  assert cli.main(["export", str(workdir), str(tmp_path / "out"), "--step", "1", "--items", "default"]) != 0
  assert "checksum mismatch" in capsys.readouterr().err
  assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
  loader = kckpt.PartialLoader(workdir=workdir, new_to_old={"big": "big"})
  with pytest.raises(errors.CheckpointReadError, match="checksum mismatch"):
    loader.transform({"big": np.zeros_like(state["big"]), "w": jnp.zeros(4)})
  ckpt.close()


def test_verify_names_the_arrays_a_checksummed_step_has_no_checksum_for(workdir, capsys):
  """A read of such an array is not checked: verify says which, and that is not a problem of the step."""
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  for step in (1, 2):
    ckpt.save(train_state(step), step=step)
  ckpt.wait_until_finished()
  table_file = ckpt.step_details(2).path / "_KCKPT_CHECKSUMS.json"
  table = json.loads(table_file.read_text())
  del table["default"]["params.dense.b"]
  table_file.write_text(json.dumps(table))

  assert kckpt.inspect.verify_step(ckpt.directory, 1).unchecked == []
  report = kckpt.inspect.verify_step(ckpt.directory, 2)
  assert report.ok and report.unchecked == ["default/params.dense.b"]
  status = cli.main(["verify", str(workdir)])
  out = capsys.readouterr().out
  assert status == 0
  line = {int(text.split(":")[0].split()[1]): text for text in out.splitlines() if text.startswith("step ")}
  assert "without one" not in line[1]
  assert line[2].startswith("step 2: ok") and "1 array without one: default/params.dense.b" in line[2]
  assert "1 with arrays that have no checksum" in out.splitlines()[-1]
  ckpt.close()


def test_a_flipped_bit_in_a_large_array_fails_the_restore_though_it_is_checked_on_another_thread(workdir):
  """Shards over `INLINE_BYTES` are hashed on kckpt's background thread: the read waits for the check."""
  from kckpt._orbax import _read_checks  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  big = rng.standard_normal(4 * _read_checks.INLINE_BYTES // 4, np.float32)  # 4 MiB: checked in a worker thread
  state = {"big": jnp.asarray(big), "small": jnp.arange(16.0)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  ckpt.save(state, step=1)
  ckpt.save(state, step=2)
  ckpt.wait_until_finished()
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
  target = {"big": jnp.zeros_like(big), "small": jnp.zeros(16)}
  for _ in range(2):  # and again: a failed read leaves nothing behind that changes the next one
    with pytest.raises(errors.CheckpointReadError, match=r"step 1.*checksum mismatch") as raised:
      ckpt.restore(target, step=1)
    assert "unreadable leaves ['big']" in str(raised.value)
  np.testing.assert_array_equal(ckpt.restore(target, step=2)["big"], big)
  ckpt.close()


def test_without_checksums_the_same_flip_restores_other_numbers(workdir):
  """What the checksums buy: Zarr v2 without them reads the changed bytes as data."""
  storage = kckpt.StorageOptions(use_zarr3=False, checksums=False)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, storage=storage)
  saved = np.random.default_rng(0).standard_normal(1 << 18, np.float32)
  ckpt.save({"w": jnp.asarray(saved)}, step=1)
  ckpt.wait_until_finished()
  assert ckpt.step_details(1).checksums is None
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
  out = ckpt.restore({"w": jnp.zeros(1 << 18)}, step=1)
  assert int(np.sum(np.asarray(out["w"]) != saved)) == 1
  ckpt.close()


def test_checksums_work_with_every_format(workdir):
  """The checksums are kckpt's, of the bytes saved: Zarr v2 with zstd (Orbax's own format) is checked too."""
  assert not kckpt.StorageOptions.orbax_defaults().checksums
  storage = kckpt.StorageOptions(use_zarr3=False, compression=True)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, storage=storage)
  saved = np.random.default_rng(0).standard_normal(1 << 18, np.float32)
  ckpt.save({"w": jnp.asarray(saved)}, step=1)
  ckpt.wait_until_finished()
  assert ckpt.step_details(1).checksums == "crc32c-shards"
  np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(1 << 18)}, step=1)["w"], saved)
  ckpt.close()


def recorded_checksums(step_path) -> dict:
  return json.loads((step_path / "_KCKPT_CHECKSUMS.json").read_text())


def test_each_saved_shard_has_the_crc32c_of_its_bytes_and_plain_orbax_reads_the_arrays(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  state = train_state(7)
  ckpt.save(state, step=1)
  ckpt.close()
  path = ckpt.step_details(1).path
  sums = recorded_checksums(path)["default"]
  w = np.asarray(state["params"]["dense"]["w"])
  assert sums["params.dense.w"] == {
    "dtype": "float32",
    "shape": [256, 512],
    "shards": [[[[0, 256], [0, 512]], crc32c.crc32c(w.tobytes())]],
  }
  mu = np.asarray(state["opt"]["mu"])
  assert sums["opt.mu"]["shards"] == [[[[0, 256], [0, 512]], crc32c.crc32c(mu.tobytes())]]
  assert "opt.count" not in sums  # a scalar: no checksum
  # The arrays' files are Orbax's own Zarr v2 (no codec of kckpt's): plain Orbax reads them.
  assert zarr2_compressor_of(path / "default", "params.dense.w") is None
  restored = ocp.PyTreeCheckpointer().restore(path / "default")
  np.testing.assert_array_equal(restored["params"]["dense"]["w"], w)


@pytest.mark.parametrize("zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_a_restore_onto_another_sharding_checks_the_saved_shards(workdir, zarr3):
  """Saved as 2 shards; restored as 4 shards, as one array and as NumPy: each read is checked, a flip is found."""
  mesh2 = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  mesh4 = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
  saved = np.random.default_rng(3).standard_normal((1024, 512), np.float32)
  two = jax.device_put(saved, jax.sharding.NamedSharding(mesh2, jax.sharding.PartitionSpec("x")))
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, storage=kckpt.StorageOptions(use_zarr3=zarr3))
  ckpt.save({"big": two}, step=1)
  ckpt.wait_until_finished()
  sums = recorded_checksums(ckpt.step_details(1).path)["default"]["big"]["shards"]
  assert [box for box, _ in sums] == [[[0, 512], [0, 512]], [[512, 1024], [0, 512]]]
  four = jax.ShapeDtypeStruct(
    saved.shape, saved.dtype, sharding=jax.sharding.NamedSharding(mesh4, jax.sharding.PartitionSpec("x"))
  )
  one = jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  for target in (four, one, two):
    np.testing.assert_array_equal(np.asarray(ckpt.restore({"big": target}, step=1)["big"]), saved)
  np.testing.assert_array_equal(ckpt.restore(step=1)["big"], saved)
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
  for target in (four, one, two):
    with pytest.raises(errors.CheckpointReadError, match=r"step 1.*\['big'\]: ChecksumMismatch: checksum mismatch"):
      ckpt.restore({"big": target}, step=1)
  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*checksum mismatch"):
    ckpt.restore(step=1)
  ckpt.close()


def test_a_restore_onto_the_saved_layout_hashes_the_bytes_it_reads_once(workdir, monkeypatch):
  """Same sharding, same dtype (Orbax casts to it anyway), or no target: no second read of a saved shard."""
  from kckpt._orbax import _read_checks  # pylint: disable=import-outside-toplevel

  whole_reads = []
  original = _read_checks._check_whole
  monkeypatch.setattr(_read_checks, "_check_whole", lambda *a: whole_reads.append(a[2]) or original(*a))
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  state = train_state(4)
  ckpt.save(state, step=1)
  ckpt.wait_until_finished()
  out = ckpt.restore(train_state(0), step=1)
  np.testing.assert_array_equal(out["opt"]["mu"], state["opt"]["mu"])
  np.testing.assert_array_equal(ckpt.restore(step=1)["params"]["dense"]["w"], state["params"]["dense"]["w"])
  assert whole_reads == []
  # Cast on read (float32 saved, bfloat16 wanted): the stored bytes are read whole and checked, then cast.
  target = jax.tree.map(
    lambda x: jnp.zeros(x.shape, jnp.bfloat16) if getattr(x, "dtype", None) == jnp.float32 else x, train_state(0)
  )
  out = ckpt.restore(target, step=1)
  assert out["params"]["dense"]["w"].dtype == jnp.bfloat16 and len(whole_reads) == 3
  np.testing.assert_array_equal(out["params"]["dense"]["w"], state["params"]["dense"]["w"].astype(jnp.bfloat16))
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*checksum mismatch"):
    ckpt.restore(target, step=1)
  ckpt.close()


@pytest.mark.parametrize(
  "damage", ["not json", "no shards", "a float checksum", "a string bound", "a box of another rank", "missing"]
)
def test_a_step_whose_checksum_file_is_damaged_is_refused_before_the_target_is_freed(workdir, damage):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(train_state(1), step=1)
  ckpt.wait_until_finished()
  path = ckpt.step_details(1).path / "_KCKPT_CHECKSUMS.json"
  table = json.loads(path.read_text())
  (box, crc), *_ = table["default"]["params.dense.w"]["shards"]
  if damage == "missing":
    path.unlink()
  elif damage == "not json":
    path.write_text("{")
  else:
    if damage == "no shards":
      table["default"]["params.dense.w"] = {"dtype": "float32"}
    elif damage == "a float checksum":
      table["default"]["params.dense.w"]["shards"][0] = [box, float(crc)]
    elif damage == "a string bound":
      table["default"]["params.dense.w"]["shards"][0] = [[[str(box[0][0]), box[0][1]], *box[1:]], crc]
    else:
      table["default"]["params.dense.w"]["shards"][0] = [box[:1], crc]
    path.write_text(json.dumps(table))
  target = train_state(0)
  wanted = {"missing": "_KCKPT_CHECKSUMS.json is missing", "not json": "is not JSON"}.get(damage, "is malformed")
  with pytest.raises(errors.CheckpointReadError, match=rf"step 1.*{wanted}"):
    ckpt.restore(target, step=1, donate=True)
  assert not target["params"]["dense"]["w"].is_deleted()
  ckpt.close()


def test_plain_orbax_in_the_same_process_writes_its_own_format(workdir, tmp_path):
  """The checksum hook changes only arrays written under an open kckpt writer's folder."""
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, storage=kckpt.StorageOptions(compression=False))
  ckpt.save(train_state(1), step=1)  # the writer is open from here on
  plain = tmp_path / "plain"
  with ocp.CheckpointManager(plain, item_handlers=ocp.PyTreeCheckpointHandler(use_zarr3=True)) as manager:
    manager.save(0, args=ocp.args.PyTreeSave({"w": jnp.ones(8)}))
    manager.wait_until_finished()
  assert "crc32c" not in codecs_of(plain / "0" / "default", "w")
  assert not (plain / "0" / "_KCKPT_CHECKSUMS.json").exists() and not (plain / "0" / "_KCKPT_LEAF_STATS.json").exists()
  ckpt.close()


def test_a_plain_orbax_checkpoint_restores_and_verifies_as_without_checksums(workdir, capsys):
  checkpoints = workdir / "checkpoints"
  with ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(step_prefix="ckpt")) as manager:
    manager.save(5, args=ocp.args.Composite(default=ocp.args.StandardSave({"w": jnp.arange(6.0)})))
    manager.wait_until_finished()
  ckpt = kckpt.Checkpointer.open(workdir)
  assert ckpt.step_details(5).checksums is None
  np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(6)})["w"], np.arange(6.0))
  assert cli.main(["verify", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert "step 5: ok" in out and "no checksums" in out and "1 without checksums" in out


# -- Provenance ----------------------------------------------------------------


def test_provenance_records_the_running_process_and_the_config(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(train_state(1), step=1, config={"lr": 3e-4, "model": {"width": 512}})
  ckpt.save(train_state(2), step=2)
  ckpt.close()
  prov = ckpt.step_details(1).provenance
  assert prov["kckpt"] == kckpt.__version__
  assert prov["jax"] == jax.__version__
  assert prov["orbax"] == ocp.__version__
  assert prov["python"] == platform.python_version()
  assert prov["process_count"] == jax.process_count() == 1
  assert prov["devices"] == {"platform": "cpu", "kind": jax.devices()[0].device_kind, "count": jax.device_count()}
  assert prov["host"] == socket.gethostname()
  assert prov["shardings"] == {"SingleDeviceSharding": 3}  # the NumPy counter is a host value
  assert prov["config"] == {"lr": 3e-4, "model": {"width": 512}}
  assert "config" not in ckpt.step_details(2).provenance
  assert prov["jaxlib"] == jaxlib.__version__
  assert prov["tensorstore"] == importlib_metadata.version("tensorstore")


_TRAIN_SCRIPT = """
import sys
import jax.numpy as jnp
import kckpt
ckpt = kckpt.Checkpointer(workdir=sys.argv[1], save_interval_steps=1)
ckpt.save({"w": jnp.ones(4)}, step=int(sys.argv[2]))
ckpt.close()
"""


def test_provenance_records_the_git_commit_of_the_training_script_and_whether_its_tree_is_dirty(tmp_path):
  repo, workdir = tmp_path / "project", str(tmp_path / "run")
  repo.mkdir()
  script = repo / "train.py"
  script.write_text(_TRAIN_SCRIPT)
  # git stops at tmp_path (which may lie inside another work tree) and ignores the caller's GIT_* settings.
  env = {k: v for k, v in subprocess_env().items() if not k.startswith("GIT_")}
  env["GIT_CEILING_DIRECTORIES"] = str(tmp_path)
  settings = ["user.name=t", "user.email=t@example.com", "commit.gpgsign=false", "core.hooksPath=/dev/null"]

  def git(*args):
    command = ["git", "-C", str(repo), *(arg for kv in settings for arg in ("-c", kv)), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.strip()

  git("init", "-q")
  git("add", "train.py")
  git("commit", "-q", "-m", "train")
  commit = git("rev-parse", "HEAD")

  def train(script, step):
    subprocess.run([PYTHON, str(script), workdir, str(step)], env=env, check=True, timeout=120)
    return kckpt.Checkpointer.open(workdir).step_details(step).provenance["git"]

  assert train(script, 1) == {"commit": commit, "dirty": False}
  script.write_text(_TRAIN_SCRIPT + "# an uncommitted change\n")
  assert train(script, 2) == {"commit": commit, "dirty": True}
  outside = tmp_path / "elsewhere" / "train.py"  # not in a git work tree
  outside.parent.mkdir()
  outside.write_text(_TRAIN_SCRIPT)
  assert train(outside, 3) is None


def test_a_config_that_is_not_json_is_refused_and_nothing_is_saved(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  with pytest.raises(ValueError, match="config"):
    ckpt.save(train_state(1), step=1, config={"fn": print})
  assert ckpt.all_steps == []
  ckpt.close()


# -- Health ----------------------------------------------------------------------


def test_nan_steps_are_marked_unhealthy_and_the_last_good_one_is_kept_and_restorable(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=2)
  for step in range(1, 7):
    value = float(step) if step <= 3 else float("nan")
    ckpt.save({"w": jnp.full((8, 8), value), "b": np.full(3, value, np.float32), "count": step}, step=step)
  ckpt.wait_until_finished()
  assert ckpt.all_steps == [3, 5, 6]
  assert [(d.step, d.reasons) for d in ckpt.retention()] == [(3, ("last good",)), (5, ("latest",)), (6, ("newest", "latest"))]
  assert ckpt.step_details(3).healthy and not ckpt.step_details(6).healthy
  assert ckpt.step_details(6).health["nonfinite_leaves"] == ["default/b", "default/w"]
  restored = ckpt.restore({"w": jnp.zeros((8, 8)), "b": np.zeros(3, np.float32), "count": 0}, step="last_good")
  np.testing.assert_array_equal(restored["w"], np.full((8, 8), 3.0))
  assert restored["count"] == 3
  ckpt.close()
  # A restarted writer sees the same: another NaN step still keeps step 3.
  again = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=2)
  assert again.step_details("last_good").step == 3
  again.save({"w": jnp.full((8, 8), np.nan), "b": np.zeros(3, np.float32), "count": 7}, step=7)
  again.close()
  assert again.all_steps == [3, 6, 7]
  # Once a healthy step is saved, the old last good one is an ordinary step again.
  again.save({"w": jnp.ones((8, 8)), "b": np.zeros(3, np.float32), "count": 8}, step=8)
  again.close()
  assert again.all_steps == [7, 8] and again.step_details("last_good").step == 8


def test_health_fn_marks_steps_by_their_metrics(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=1, health_fn=lambda m: m["loss"] < 10)
  ckpt.save({"w": jnp.ones(4)}, step=1, metrics={"loss": 2.0})
  ckpt.save({"w": jnp.ones(4) * 2}, step=2, metrics={"loss": 50.0})
  ckpt.close()
  assert ckpt.all_steps == [1, 2]  # 1 is the last good step
  health = dict(ckpt.step_details(2).health)
  assert 0 < health.pop("disk_bytes") <= kckpt.inspect.disk_bytes(ckpt.step_details(2).path)
  assert health == {
    "healthy": False,
    "nonfinite_leaf_count": 0,
    "nonfinite_leaves": [],
    "health_fn": False,
    "statistics_from_processes": 1,
  }
  np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(4)}, step="last_good")["w"], np.ones(4))


def test_a_health_fn_that_raises_names_the_step_and_saves_nothing(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, health_fn=lambda m: m["loss"] < 10)
  with pytest.raises(ValueError, match=r"save\(step=4\): health_fn raised TypeError"):
    ckpt.save({"w": jnp.ones(4)}, step=4)  # no metrics: the function cannot index None
  assert ckpt.all_steps == []
  ckpt.close()


def test_last_good_without_any_healthy_step_is_not_found(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save({"w": jnp.full(4, np.inf)}, step=1)
  ckpt.close()
  with pytest.raises(kckpt.CheckpointNotFoundError, match="No healthy step \\(every step was marked unhealthy"):
    ckpt.restore(step="last_good")


# -- Per-leaf statistics -----------------------------------------------------------


def test_leaf_statistics_equal_numpys_on_the_saved_arrays(workdir):
  rng = np.random.default_rng(3)
  state = {
    "params": {
      "w": jnp.asarray(rng.standard_normal((64, 32), np.float32)),
      "e": jnp.asarray(rng.standard_normal(100), jnp.bfloat16),
    },
    "host": rng.standard_normal(7),  # a NumPy leaf (float64)
    "bad": jnp.asarray([1.0, np.nan, 3.0]),
    "ints": jnp.arange(5),  # not floating: no statistics
  }
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(state, step=1)
  ckpt.close()
  stats = kckpt.inspect.leaf_stats(ckpt.directory, 1)["default"]
  assert set(stats) == {"params.w", "params.e", "host", "bad"}
  saved = ckpt.restore()
  for name, value in {"params.w": saved["params"]["w"], "params.e": saved["params"]["e"], "host": saved["host"]}.items():
    x = np.asarray(value, np.float64)
    expected = {"norm": np.linalg.norm(x), "min": x.min(), "max": x.max(), "mean": x.mean()}
    for key, want in expected.items():
      assert stats[name][key] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, key)
    assert stats[name]["nonfinite"] == 0 and stats[name]["size"] == x.size
  assert stats["bad"]["nonfinite"] == 1 and np.isnan(stats["bad"]["norm"]) and np.isnan(stats["bad"]["min"])


def test_statistics_and_checksums_of_arrays_of_many_blocks_equal_numpys(workdir):
  """Arrays are reduced in cache-sized blocks: the merged numbers are those of the whole array."""
  from kckpt._orbax import _checksums, _leafstats  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(5)
  per_block = _leafstats.BLOCK_BYTES // 4
  w = rng.standard_normal(per_block * 5 // 2).astype(np.float32)  # three blocks, the last one half full
  w[: per_block // 2] += 3.0  # the blocks differ, so a merge that kept one block's numbers would show
  nan_late = w.copy()
  nan_late[-7] = np.nan  # a NaN in the last block only
  e = rng.standard_normal(per_block * 3).astype(jnp.bfloat16)  # bfloat16: blocks of twice as many values
  state = {"w": jnp.asarray(w), "nan_late": jnp.asarray(nan_late), "e": jnp.asarray(e)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  ckpt.save(state, step=1)
  ckpt.close()
  stats = kckpt.inspect.leaf_stats(ckpt.directory, 1)["default"]
  for name, value in {"w": w, "e": e}.items():
    x = np.asarray(value, np.float64)
    expected = {"norm": np.linalg.norm(x), "min": x.min(), "max": x.max(), "mean": x.mean()}
    for key, want in expected.items():
      assert stats[name][key] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, key)
    assert stats[name]["nonfinite"] == 0 and stats[name]["size"] == x.size
  assert stats["nan_late"]["nonfinite"] == 1 and stats["nan_late"]["size"] == w.size
  assert all(np.isnan(stats["nan_late"][key]) for key in ("norm", "min", "max", "mean"))
  # The CRC32C recorded per shard is that of the whole array's bytes.
  box = ((0, w.size),)
  _, sums = _checksums._reduce([(box, w)], w.shape, True, "w")  # pylint: disable=protected-access
  assert sums["shards"] == [[[[0, w.size]], crc32c.crc32c(w.tobytes())]]
  report = kckpt.inspect.verify_step(ckpt.directory, 1)  # every shard read back and hashed whole
  assert report.ok and report.unchecked == []
  np.testing.assert_array_equal(np.asarray(ckpt.restore(state)["e"]), e)


def test_a_saves_reductions_run_on_one_background_thread(workdir, monkeypatch):
  """Statistics and checksums run on kckpt's one worker, not on Orbax's default executor (a thread per core and more)."""
  import threading  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _checksums  # pylint: disable=import-outside-toplevel

  seen = []
  reduce = _checksums._reduce  # pylint: disable=protected-access

  def observed(*args):
    seen.append(threading.current_thread().name)
    return reduce(*args)

  monkeypatch.setattr(_checksums, "_reduce", observed)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save({f"w{i}": jnp.full((64,), float(i)) for i in range(8)}, step=1)
  ckpt.close()
  assert len(seen) == 8
  assert set(seen) == {"kckpt-background_0"}  # one thread for every array
  assert kckpt.inspect.leaf_stats(ckpt.directory, 1)["default"]["w3"]["max"] == 3.0


def test_a_restores_checks_of_large_shards_run_on_the_background_thread(workdir, monkeypatch):
  """Read through TensorStore (here: compressed), shards over INLINE_BYTES are hashed on kckpt's one worker;
  smaller ones on the event loop's thread."""
  import threading  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _read_checks  # pylint: disable=import-outside-toplevel

  state = {"large": jnp.arange(_read_checks.INLINE_BYTES // 4 * 3, dtype=jnp.float32), "small": jnp.ones(16)}
  compressed = kckpt.StorageOptions(compression=True)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False, storage=compressed)
  ckpt.save(state, step=1)
  seen = {}
  check = _read_checks._check  # pylint: disable=protected-access

  def observed(expected, box, saved, data):
    seen[data.size] = threading.current_thread().name
    return check(expected, box, saved, data)

  monkeypatch.setattr(_read_checks, "_check", observed)
  large = np.asarray(state["large"])
  restored = ckpt.restore(state)  # donates `state`
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored["large"]), large)
  assert seen[large.size] == "kckpt-background_0"
  assert seen[16] != "kckpt-background_0"


@pytest.mark.parametrize("direct", [True, False], ids=["from-the-data-file", "through-tensorstore"])
def test_a_checked_shard_stays_within_the_restores_bound_until_its_check_is_done(workdir, monkeypatch, direct):
  """A shard is hashed before Orbax gets it: its bytes leave the bound on the bytes read at once only after."""
  import threading  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _direct_reads, _inflight, _read_checks  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(_read_checks, "INLINE_BYTES", 1024)  # every shard below is hashed on the background thread
  sizes = [512 * (i + 3) for i in range(6)]  # float32 counts: 6 KiB to 16 KiB, one size per leaf
  state = {f"w{i}": jnp.arange(n, dtype=jnp.float32) for i, n in enumerate(sizes)}
  storage = kckpt.StorageOptions(compression=not direct)  # compressed chunks are read through TensorStore
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False, storage=storage)
  ckpt.save(state, step=1)
  events, lock, direct_reads = [], threading.Lock(), []
  check, read = _read_checks._check, _direct_reads._read  # pylint: disable=protected-access

  def observed(expected, box, saved, data):
    check(expected, box, saved, data)
    with lock:
      events.append(("checked", data.nbytes))

  def observed_read(path, offset, out, *rest):
    crc = read(path, offset, out, *rest)  # read and hashed
    with lock:
      events.append(("checked", out.nbytes))
      direct_reads.append(out.nbytes)
    return crc

  class Recording(_inflight.InOrderLimit):
    def release(self, nbytes):
      with lock:
        events.append(("released", nbytes))
      super().release(nbytes)

  monkeypatch.setattr(_read_checks, "_check", observed)
  monkeypatch.setattr(_direct_reads, "_read", observed_read)
  monkeypatch.setattr(_inflight, "InOrderLimit", Recording)
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1)
  ckpt.close()
  for name, leaf in state.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(leaf))
  for n in sizes:
    assert events.index(("checked", 4 * n)) < events.index(("released", 4 * n)), events
  assert sorted(direct_reads) == ([4 * n for n in sizes] if direct else []), direct_reads


def test_saved_shards_are_read_from_their_data_files_and_hashed_as_they_are_read(workdir, monkeypatch):
  """The default format: each saved shard of a checked restore is read with preadv and hashed slab by slab on
  kckpt's read threads, not through TensorStore; a damaged one is read again through TensorStore and refused."""
  import threading  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _direct_reads  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(_direct_reads, "SLAB_BYTES", 4096)  # several slabs per shard
  state = {"big": jnp.arange(300_000, dtype=jnp.float32).reshape(600, 500), "b": jnp.ones(3000), "tiny": jnp.ones(3)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save(state, step=1)
  reads, read = [], _direct_reads._read  # pylint: disable=protected-access

  def observed_read(path, offset, out, *rest):
    reads.append((out.shape, threading.current_thread().name))
    return read(path, offset, out, *rest)

  monkeypatch.setattr(_direct_reads, "_read", observed_read)
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1)
  for name, leaf in state.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(leaf))
  # "tiny" (12 bytes) is stored inside the database's index: TensorStore reads it.
  assert sorted(shape for shape, _ in reads) == [(600, 500), (3000,)], reads
  assert all(thread.startswith("kckpt-read") for _, thread in reads), reads
  assert _direct_reads._indexes == {}  # pylint: disable=protected-access  # nothing kept after the restore

  reads.clear()
  flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*\['big'\].*checksum mismatch"):
    ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1)
  assert (600, 500) in [shape for shape, _ in reads]  # read from the file first, found not to be the saved bytes
  ckpt.close()


def test_a_data_file_cut_short_fails_the_direct_read_and_the_restore_names_the_leaf(workdir, monkeypatch):
  """A shard whose data file ends early: the direct read stops (an OSError), TensorStore's read says what is wrong."""
  from kckpt._orbax import _direct_reads, _ocdbt  # pylint: disable=import-outside-toplevel

  state = {"big": jnp.arange(100_000, dtype=jnp.float32), "other": jnp.ones(2000)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save(state, step=1)
  item = ckpt.step_details(1).path / "default"
  where = _ocdbt.read_index(str(item)).indirect[b"big/0"]
  os.truncate(where.path, where.offset + where.length // 2)
  failed, read = [], _direct_reads._read  # pylint: disable=protected-access

  def observed_read(path, offset, out, *rest):
    try:
      return read(path, offset, out, *rest)
    except OSError as e:
      failed.append(str(e))
      raise

  monkeypatch.setattr(_direct_reads, "_read", observed_read)
  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*'big'"):
    ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1, donate=False)  # not donated: no file check first
  assert failed and "more expected" in failed[0], failed
  ckpt.close()


def test_a_direct_read_stops_between_slabs_once_another_read_of_the_restore_failed(workdir, monkeypatch):
  """A shard read from its data file looks between slabs: once another read of the same restore has failed, it
  stops (`ReadAbandoned`, never the error raised) instead of reading on, and the restore raises the first error."""
  import threading  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _direct_reads, _drain  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(_direct_reads, "SLAB_BYTES", 4096)  # "long": 64 slabs
  state = {"bad": jnp.arange(4096, dtype=jnp.float32), "long": jnp.arange(65536, dtype=jnp.float32)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save(state, step=1)
  flip_bit_in_the_data_of(ckpt.step_details(1).path / "default", "bad")
  long_started, failed, asked = threading.Event(), threading.Event(), []
  read, wait_out = _direct_reads._read, _drain._wait_out  # pylint: disable=protected-access

  def observed_read(path, offset, out, stopped):
    if out.size == 65536:  # "long" waits until the restore has failed, then reads
      long_started.set()
      assert failed.wait(60)
      asked.append([])  # (once the restore failed, kckpt reads each leaf alone to name the ones at fault)
      return read(path, offset, out, lambda answers=asked[-1]: answers.append(stopped()) or answers[-1])
    assert long_started.wait(60)  # "bad" fails only once "long" is under way
    return read(path, offset, out, stopped)

  def observed_wait_out(loop, pending):
    failed.set()  # the restore's first error is in: what is still running is waited out
    return wait_out(loop, pending)

  monkeypatch.setattr(_direct_reads, "_read", observed_read)
  monkeypatch.setattr(_drain, "_wait_out", observed_wait_out)
  with pytest.raises(errors.CheckpointReadError, match=r"step 1.*'bad'.*checksum mismatch"):
    ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1, donate=False)
  assert asked[0] == [True]  # stopped before its first slab, not after its 64th
  ckpt.close()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="JAX takes a host buffer as an array's own only on CPU")
def test_a_large_shard_read_from_its_file_becomes_the_restored_cpu_array_without_a_copy(workdir, monkeypatch):
  """A shard of 4 MiB or more is read into a private mapping of its own (page-aligned, no huge pages), which JAX on
  CPU takes as the restored array's buffer instead of copying it; the mapping lives as long as that array."""
  import gc  # pylint: disable=import-outside-toplevel
  import mmap  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _direct_reads  # pylint: disable=import-outside-toplevel

  big = np.random.default_rng(0).standard_normal((1100, 1024)).astype(np.float32)  # 4.4 MB
  state = {"big": jnp.asarray(big), "small": jnp.ones(3000)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save(state, step=1)
  buffers, buffer = [], _direct_reads._buffer  # pylint: disable=protected-access
  monkeypatch.setattr(_direct_reads, "_buffer", lambda shape, dtype: buffers.append(buffer(shape, dtype)) or buffers[-1])
  restored = ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored["small"]), np.ones(3000))
  assert sorted(b.size for b in buffers) == [3000, 1100 * 1024]
  address = next(b for b in buffers if b.shape == (1100, 1024)).ctypes.data
  assert address % mmap.PAGESIZE == 0  # its own mapping (malloc would start it 16 bytes in)
  assert restored["big"].unsafe_buffer_pointer() == address  # the restored array is that buffer
  if os.path.exists("/proc/self/smaps") and hasattr(mmap, "MADV_NOHUGEPAGE"):
    assert "nh" in _vm_flags(address)  # no huge pages asked for
  buffers.clear()
  gc.collect()
  churn = [np.ones(1 << 20) for _ in range(8)]  # memory freed by now would be reused and overwritten
  np.testing.assert_array_equal(np.asarray(restored["big"]), big)
  del churn


def _vm_flags(address: int) -> list[str]:
  """The VmFlags of the mapping of this process that holds `address` (Linux)."""
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split(" ", 1)[0]
      if "-" in head and not head.endswith(":"):
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= address < hi
      elif inside and line.startswith("VmFlags:"):
        return line.split()[1:]
  raise AssertionError(f"no mapping holds {address:#x}")


def test_a_direct_read_looks_before_it_starts_and_between_slabs_whether_to_stop(tmp_path, monkeypatch):
  """`_read` asks `stopped` before it opens the file and after each slab: it stops there, the rest unread."""
  import asyncio  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _checksums, _direct_reads, _drain  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(_direct_reads, "SLAB_BYTES", 4096)
  data = np.arange(16 * 1024, dtype=np.uint32)  # 64 KiB: 16 slabs
  path = tmp_path / "data"
  path.write_bytes(b"\xff" * 100 + data.tobytes())
  per_slab = 4096 // 4
  for stop_at in (1, 4):  # 1: before the file is opened; 4: after the third slab
    calls = []
    out = np.full(data.shape, 7, np.uint32)

    def stopped(calls=calls, stop_at=stop_at):
      calls.append(None)
      return len(calls) == stop_at

    with pytest.raises(_drain.ReadAbandoned):
      _direct_reads._read(str(path), 100, out, stopped)  # pylint: disable=protected-access
    assert len(calls) == stop_at
    read = (stop_at - 1) * per_slab
    np.testing.assert_array_equal(out[:read], data[:read])
    assert (out[max(read, per_slab) :] == 7).all()  # (the readahead probe may fill the first 4 KiB)
  out = np.zeros_like(data)
  assert _direct_reads._read(str(path), 100, out) == _checksums.crc32c_of(data)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out, data)
  loop = asyncio.new_event_loop()
  assert not _drain.abandoned_loop(loop)
  loop.close()
  assert _drain.abandoned_loop(loop)  # a call that ended (a Ctrl-C closes its loop): its reads stop too


def test_sharded_bfloat16_and_bool_shards_are_read_from_their_files_as_saved(workdir, monkeypatch):
  """Each device's saved shard (chunk keys other than 0.0) of several dtypes, read directly, equals what was saved."""
  from jax.sharding import NamedSharding, PartitionSpec

  from kckpt._orbax import _direct_reads  # pylint: disable=import-outside-toplevel

  mesh = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
  sharding = NamedSharding(mesh, PartitionSpec("a", "b"))
  rng = np.random.default_rng(0)
  values = {
    "f32": rng.standard_normal((64, 48)).astype(np.float32),
    "bf16": rng.standard_normal((64, 48)).astype(jnp.bfloat16),
    "bool": rng.random((128, 64)) > 0.5,
    "i8": rng.integers(-100, 100, (64, 96)).astype(np.int8),
  }
  state = {name: jax.device_put(v, sharding) for name, v in values.items()}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  ckpt.save(state, step=1)
  reads, read = [], _direct_reads._read  # pylint: disable=protected-access
  monkeypatch.setattr(
    _direct_reads, "_read", lambda path, offset, out, *rest: reads.append(out.dtype) or read(path, offset, out, *rest)
  )
  target = {name: jax.device_put(np.zeros_like(v), sharding) for name, v in values.items()}
  restored = ckpt.restore(target, step=1)
  ckpt.close()
  for name, v in values.items():
    assert restored[name].sharding == sharding and restored[name].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(restored[name]), v)
  assert sorted(map(str, reads)) == sorted(str(v.dtype) for v in values.values() for _ in range(4)), reads


@pytest.mark.parametrize(
  "storage",
  [kckpt.StorageOptions(compression=True), kckpt.StorageOptions(use_zarr3=True), kckpt.StorageOptions(use_ocdbt=False)],
  ids=["compressed", "zarr3", "no-ocdbt"],
)
def test_other_formats_are_read_through_tensorstore_and_checked(workdir, monkeypatch, storage):
  from kckpt._orbax import _direct_reads  # pylint: disable=import-outside-toplevel

  reads = []
  monkeypatch.setattr(_direct_reads, "_read", lambda *args: reads.append(args) or 0)
  state = {"big": jnp.arange(30_000, dtype=jnp.float32)}
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False, storage=storage)
  ckpt.save(state, step=1)
  np.testing.assert_array_equal(np.asarray(ckpt.restore(jax.tree.map(jnp.zeros_like, state), step=1)["big"]), state["big"])
  assert reads == []
  ckpt.close()


def test_a_forked_process_starts_its_own_background_worker():
  """The worker thread does not survive a fork: a forked child's first reduction runs on a new one."""
  import multiprocessing  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _background  # pylint: disable=import-outside-toplevel

  _background._worker().submit(int).result()  # pylint: disable=protected-access  # the parent's thread is running
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork() of a multi-threaded process
    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # JAX's: the child touches no JAX
    child = multiprocessing.get_context("fork").Process(target=_sum_on_the_background_worker)
    child.start()
  child.join(timeout=60)
  if child.exitcode is None:  # the child waits for a thread it does not have
    child.kill()
    child.join()
    pytest.fail("the forked child's reduction never ran")
  assert child.exitcode == 0


def _sum_on_the_background_worker() -> None:
  import asyncio  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _background  # pylint: disable=import-outside-toplevel

  os._exit(0 if asyncio.run(_background.run(sum, [1, 2])) == 3 else 1)  # pylint: disable=protected-access


def test_reductions_merge_blocks_as_numpy_reduces_whole_arrays():
  """NaN and infinities in any block, several dtypes and shapes: the numbers and CRCs of whole arrays."""
  from kckpt._orbax import _checksums, _leafstats  # pylint: disable=import-outside-toplevel

  per_block = _leafstats.BLOCK_BYTES // 4
  rng = np.random.default_rng(7)
  nan_first = rng.standard_normal(per_block * 3).astype(np.float32)
  nan_first[5] = np.nan  # the later, finite blocks must not hide it
  inf_middle = rng.standard_normal(per_block * 3).astype(np.float32)
  inf_middle[per_block + 1] = -np.inf
  cases = {
    "nan_first": nan_first,
    "inf_middle": inf_middle,
    "float16": rng.standard_normal(per_block * 3).astype(np.float16),
    "float64": rng.standard_normal(per_block),  # two blocks of 8-byte values
    "int32": np.arange(per_block * 2, dtype=np.int32),  # a CRC, no statistics
    "scalar": np.array(2.5, np.float32),
    "transposed": rng.standard_normal((512, 300)).astype(np.float32).T,  # not C-contiguous
    "empty": np.zeros((0, 4), np.float32),
  }
  for name, x in cases.items():
    box = tuple((0, n) for n in x.shape)
    stats, sums = _checksums._reduce([(box, x)], x.shape, True, name)  # pylint: disable=protected-access
    assert sums["shards"] == [[[list(b) for b in box], crc32c.crc32c(np.ascontiguousarray(x).tobytes())]], name
    if x.dtype.kind != "f" or not x.size:
      assert stats is None, name
      continue
    values = np.asarray(x, np.float64).reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
      assert stats.count == values.size and stats.nonfinite == int(np.sum(~np.isfinite(values))), name
      for got, want in ((stats.min, values.min()), (stats.max, values.max()), (stats.total, values.sum())):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-3, nan_ok=True), name
      assert stats.squares == pytest.approx(float(values @ values), rel=1e-4, nan_ok=True), name


def test_no_write_spec_outlives_its_save(workdir):
  """The array hook keeps each spec only until its array is written (or its step is done, for NumPy leaves)."""
  from kckpt._orbax import _checksums  # pylint: disable=import-outside-toplevel

  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  for step in (1, 2, 3):
    ckpt.save({"w": jnp.ones(4), "host": np.ones((2, 2)), "more": [np.zeros(3)] * 4}, step=step)
  ckpt.wait_until_finished()
  assert not [v for v in _checksums._owners.values() if v[1].startswith(ckpt.directory.as_posix())]
  ckpt.close()


# -- On the command line -------------------------------------------------------------


def run_with_health_and_provenance(workdir):
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, health_fn=lambda m: m["loss"] < 1) as ckpt:
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.0, np.nan])}, "step": 3}
    ckpt.save(state, step=1, metrics={"loss": 0.5}, config={"lr": 0.1})
    ckpt.save({"params": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, "step": 3}, step=2, metrics={"loss": 2.0})
    ckpt.save({"params": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, "step": 3}, step=3, metrics={"loss": 0.1})
  return ckpt


def test_ls_shows_health_and_with_details_provenance(workdir, capsys):
  run_with_health_and_provenance(workdir)
  assert cli.main(["ls", str(workdir), "--details"]) == 0
  out = capsys.readouterr().out.splitlines()
  header = next(line for line in out if line.startswith("step "))
  assert "health" in header.split()
  rows = {line.split()[0]: line for line in out if line.strip()[:1].isdigit()}
  assert "nan/inf in 1 leaf" in rows["1"] and "health_fn" in rows["2"] and " ok " in rows["3"]
  details = {line.split(":")[0]: line for line in out if line.startswith("step ") and ":" in line and "saved" not in line}
  assert f"jax {jax.__version__}" in details["step 1"] and f"host {socket.gethostname()}" in details["step 1"]
  assert 'config {"lr": 0.1}' in details["step 1"] and "config" not in details["step 2"]
  assert "checksums crc32c-shards" in details["step 3"]
  assert cli.main(["ls", str(workdir), "--json"]) == 0
  import json  # pylint: disable=import-outside-toplevel

  steps = json.loads(capsys.readouterr().out)["steps"]
  assert [s["healthy"] for s in steps] == [False, False, True]
  for s in steps:  # the size recorded at commit (no walk of the folder), a few hundred bytes of metadata aside
    walked = kckpt.inspect.disk_bytes(workdir / "checkpoints" / f"ckpt_{s['step']}")
    assert s["size_bytes"] == s["health"]["disk_bytes"] and walked - 2000 < s["size_bytes"] <= walked
  assert steps[0]["provenance"]["config"] == {"lr": 0.1}


def test_tree_stats_prints_the_saved_statistics(workdir, capsys):
  run_with_health_and_provenance(workdir)
  assert cli.main(["tree", str(workdir), "--step", "1", "--stats"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1].split() == ["path", "shape", "dtype", "bytes", "norm", "min", "max", "mean", "nonfinite"]
  w = next(line for line in out if line.startswith("params.w")).split()
  assert w[-5:] == [f"{np.linalg.norm(np.arange(6.0)):.4g}", "0", "5", "2.5", "0"]
  b = next(line for line in out if line.startswith("params.b")).split()
  assert b[-5:] == ["nan", "nan", "nan", "nan", "1"]


def test_diff_lists_provenance_differences_without_changing_the_status(workdir, capsys):
  run_with_health_and_provenance(workdir)
  assert cli.main(["diff", f"{workdir}@2", "@3"]) == 0  # same arrays
  out = capsys.readouterr().out
  assert "\nprovenance " not in out  # same process, no config
  assert cli.main(["diff", f"{workdir}@1", "@3"]) == 1
  assert 'provenance config: {"lr": 0.1} -> null' in capsys.readouterr().out


def test_the_notebook_view_shows_health_metric_columns_and_plots(workdir):
  ckpt = run_with_health_and_provenance(workdir)
  page = ckpt._repr_html_()
  table = HtmlTable(page, "kckpt-steps")
  assert "health" in table.header and "loss" in table.header
  health = table.column("health")
  assert health == ["ok", "unhealthy: health_fn", "unhealthy: nan/inf in 1 leaf"]  # steps 3, 2, 1
  assert page.count("<polyline") == 1 and "step 1..3: 0.5 -&gt; 0.1" in page
  assert "UNHEALTHY" in ckpt.summary()
  norms = kckpt.inspect.leaf_history(ckpt.directory, "params.w")
  assert [s for s, _ in norms.points] == [1, 2, 3]
  assert norms.points[0][1] == pytest.approx(np.linalg.norm(np.arange(6.0)))
  assert "<polyline" in norms._repr_html_()
