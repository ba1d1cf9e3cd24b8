"""Integrity: checksums of array data, and the provenance recorded in each step."""

from __future__ import annotations

import os
import platform
import socket

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

import kckpt
from kckpt import cli
from kckpt import errors


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


def test_a_flipped_bit_is_found_by_verify_and_refused_by_restore(workdir, capsys):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None)
  for step in (1, 2, 3):
    ckpt.save(train_state(step), step=step)
  ckpt.wait_until_finished()
  assert all(ckpt.step_details(s).checksums == "crc32c" for s in (1, 2, 3))
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

  with pytest.raises(errors.CheckpointReadError, match=r"step 2.*checksum mismatch") as raised:
    ckpt.restore(train_state(0), step=2)
  assert f"unreadable leaves [{leaf!r}]" in str(raised.value)  # the leaf verify named
  # The other steps are intact and restore bit for bit.
  for step in (1, 3):
    out = ckpt.restore(train_state(0), step=step)
    np.testing.assert_array_equal(out["params"]["dense"]["w"], train_state(step)["params"]["dense"]["w"])
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


def test_checksums_need_zarr3():
  with pytest.raises(ValueError, match="checksums=True.*use_zarr3=True"):
    kckpt.StorageOptions(use_zarr3=False)
  assert not kckpt.StorageOptions.orbax_defaults().checksums


def test_every_array_chunk_carries_a_crc32c_and_plain_orbax_reads_it(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  state = train_state(7)
  ckpt.save(state, step=1)
  ckpt.close()
  item = ckpt.step_details(1).path / "default"
  assert codecs_of(item, "params.dense.w") == ["bytes", "crc32c"]
  assert codecs_of(item, "opt.count") == ["bytes", "crc32c"]  # NumPy leaves too
  restored = ocp.PyTreeCheckpointer().restore(item)
  np.testing.assert_array_equal(restored["params"]["dense"]["w"], state["params"]["dense"]["w"])


def test_plain_orbax_in_the_same_process_writes_its_own_format(workdir, tmp_path):
  """The checksum hook changes only arrays written under an open kckpt writer's folder."""
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, storage=kckpt.StorageOptions(compression=False))
  ckpt.save(train_state(1), step=1)  # the writer is open from here on
  plain = tmp_path / "plain"
  with ocp.CheckpointManager(plain, item_handlers=ocp.PyTreeCheckpointHandler(use_zarr3=True)) as manager:
    manager.save(0, args=ocp.args.PyTreeSave({"w": jnp.ones(8)}))
    manager.wait_until_finished()
  assert "crc32c" not in codecs_of(plain / "0" / "default", "w")
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


def test_a_config_that_is_not_json_is_refused_and_nothing_is_saved(workdir):
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1)
  with pytest.raises(ValueError, match="config"):
    ckpt.save(train_state(1), step=1, config={"fn": print})
  assert ckpt.all_steps == []
  ckpt.close()
