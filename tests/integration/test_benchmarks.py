"""The benchmark entry points run (on tiny sizes) so they never rot. No timing is asserted."""

import json

from benchmarks import listing
from benchmarks import run


def test_listing_benchmark_runs(tmp_path):
  out = tmp_path / "listing.json"
  report = listing.main(["--sizes", "3", "12", "--repeats", "1", "--json", str(out)])
  assert [r["steps"] for r in report["results"]] == [3, 12]
  assert json.loads(out.read_text())["results"][1]["steps"] == 12
  for row in report["results"]:
    assert row["kckpt_open_ms"] > 0 and row["orbax_open_ms"] > 0


def test_donated_restore_uses_less_memory():
  """Peak RSS of real restores in fresh processes: donating the target must lower it."""
  from benchmarks import restore_memory

  report = restore_memory.measure(megabytes=128, leaves=4)
  added = {mode: r["added_bytes"] for mode, r in report["results"].items()}
  state = 128 * 2**20
  assert added["kckpt_no_donate"] > 0.75 * state  # the restored copy sits beside the target
  assert added["kckpt_donate"] < added["kckpt_no_donate"] - 0.4 * state


def test_run_benchmark_runs(tmp_path, capsys):
  out = tmp_path / "run.json"
  report = run.main([
      "--sizes-mb", "0.25", "--bf16-mb", "0.25", "--repeats", "1", "--tiny-saves", "2",
      "--sweep-mb", "0.25", "--layouts", "few", "--disk-mb", "1", "--dir", str(tmp_path), "--quiet", "--json", str(out),
      "--no-realistic",
  ])  # fmt: skip
  saved = json.loads(out.read_text())
  assert [r["case"] for r in saved["sync"]] == ["256 KiB float32, 4 leaves", "256 KiB bfloat16, 8 leaves"]
  for row in report["sync"]:
    for system in ("kckpt", "orbax"):
      summary = row["summary"][system]
      assert summary["save_mb_per_s"]["median"] > 0 and summary["restore_mb_per_s"]["median"] > 0
      assert summary["async_blocked_s"]["median"] > 0 and summary["async_durable_s"]["median"] > 0
  assert set(saved["tiny"]["summary"]) == {"kckpt", "orbax"}
  assert {name for name in saved["sweep"][0]["summary"]} >= {"orbax", "kckpt", "zstd, OCDBT, zarr2 (Orbax's format)"}
  assert saved["disk"]["summary"]["write_fsync_1_stream_mb_per_s"]["median"] > 0
  assert {g["goal"] for g in saved["goals"]} >= {"save >= 2.0x Orbax", "restore >= 1.5x Orbax"}
  assert list(tmp_path.iterdir()) == [out]  # the benchmark removed what it wrote
  printed = capsys.readouterr().out
  assert "Sync save" in printed and "Tiny state" in printed and "Goals" in printed


def test_realistic_benchmark_runs(tmp_path, capsys):
  """The realistic states' run on a small deep state: every system restores what it saved (checked inside)."""
  from benchmarks import realistic

  out = tmp_path / "realistic.json"
  rows = realistic.main(
    ["--states", "deep", "--deep-leaves", "16", "--rounds", "1", "--settle-secs", "0", "--dir", str(tmp_path), "--quiet"]
    + ["--json", str(out)]
  )
  (row,) = rows
  assert row["leaves"] == 3 * 16 + 1  # params, mu, nu and the step count
  assert set(row["samples"]) == {"kckpt", "orbax", "orbax tuned", "files"}
  for system, got in row["samples"].items():
    assert len(got["save_s"]) == 1 and len(got["restore_s"]) == 1 and len(got["restore_no_target_s"]) == 1
    assert len(got["async_blocked_s"]) == (0 if system == "files" else 1)
    assert got["save_user_s"][0] + got["save_kernel_s"][0] > 0  # the CPU time of the save, beside its wall time
  assert row["ratios"]["restore vs files"] > 0
  assert json.loads(out.read_text())[0]["state"] == "deep"
  assert list(tmp_path.iterdir()) == [out]
  printed = capsys.readouterr().out
  assert "| kckpt |" in printed and "| restore >= 0.8 of plain files |" in printed and "save CPU s: user / kernel" in printed
  assert {g["goal"] for g in realistic.goals(rows)} >= {"save >= 1.0x tuned Orbax", "async: blocked <= 2% of a sync save"}


def test_realistic_states_hold_realistic_values():
  """Parameters and moments are drawn (not constant), in the dtypes of mixed-precision training."""
  import numpy as np

  from benchmarks import states

  state = states.make("mixed", scale=0.02)
  assert str(state["params"]["wte"].dtype) == "bfloat16"
  assert state["opt_state"]["mu"]["wte"].dtype == np.float32
  nu = np.asarray(state["opt_state"]["nu"]["h00"]["mlp"]["c_fc"]["kernel"])
  assert (nu >= 0).all() and np.unique(nu).size > 0.9 * nu.size
  assert abs(float(np.asarray(state["params"]["h00"]["ln_1"]["scale"]).mean()) - 1) < 0.05
  assert len(states.shapes_of("deep", deep_leaves=3000)) == 3000


def test_checksums_benchmark_compares_checked_and_unchecked_reads_of_the_same_step(tmp_path, capsys, monkeypatch):
  """Its unchecked arm really skips the checks (a damaged step restores there, and only there)."""
  import contextlib

  import jax.numpy as jnp
  import pytest

  import kckpt
  from benchmarks import checksums
  from kckpt._orbax import _direct_reads, _read_checks
  from tests.test_integrity import flip_bit_in_the_middle_of_the_largest_data_file

  # Which arm each shard check of the benchmark's restores ran in (a shard read straight from its data file is
  # hashed as it is read; one read through TensorStore is checked after).
  checks = {"checked": 0, "unchecked": 0}
  arm = ["checked"]
  check, read, unchecked = _read_checks._check, _direct_reads._read, checksums.unchecked

  def counted_check(*args):
    checks[arm[0]] += 1
    return check(*args)

  def counted_read(*args):
    checks[arm[0]] += 1
    return read(*args)

  @contextlib.contextmanager
  def counted_unchecked():
    checks["unchecked entered"] = checks.get("unchecked entered", 0) + 1
    arm[0] = "unchecked"
    try:
      with unchecked():
        yield
    finally:
      arm[0] = "checked"

  monkeypatch.setattr(_read_checks, "_check", counted_check)
  monkeypatch.setattr(_direct_reads, "_read", counted_read)
  monkeypatch.setattr(checksums, "unchecked", counted_unchecked)
  out = tmp_path / "checksums.json"
  (row,) = checksums.main(
    ["--states", "deep", "--deep-leaves", "8", "--repeats", "1", "--cold-repeats", "1"]
    + ["--save-repeats", "1", "--json", str(out)]
  )
  assert row["leaves"] == 3 * 8 + 1
  # Each arm restored 4 times (a warm-up and a timed round, warm and cold): every array checked each time, or none.
  assert checks["unchecked entered"] == 4 and checks["unchecked"] == 0
  assert checks["checked"] % 4 == 0 and checks["checked"] >= 4 * 3 * 8
  assert set(row["ratio"]) == {"warm", "cold", "warm cpu", "cold cpu", "warm user", "cold user", "save", "async_blocked"}
  assert set(row["ratio_mean"]) == set(row["ratio"]) and not row["ratio_se"]  # one round each: no standard error
  assert set(row["extra cpu"]) == {"warm", "cold"}
  assert all(set(extra) == {"hash thread", "other threads"} for extra in row["extra cpu"].values())
  assert all(seconds == 0 for kind in ("warm", "cold") for seconds in row["no checksums"]["runs"][f"{kind} hash"])
  assert json.loads(out.read_text())[0]["state"] == "deep"
  assert "restore cold" in capsys.readouterr().out
  monkeypatch.undo()

  state = {"w": jnp.arange(1 << 16, dtype=jnp.float32)}
  with kckpt.Checkpointer(workdir=tmp_path / "run", save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
    flip_bit_in_the_middle_of_the_largest_data_file(ckpt.step_details(1).path)
    with checksums.unchecked():
      assert (ckpt.restore(state, step=1, donate=False)["w"] != state["w"]).sum() == 1  # other numbers, unchecked
    with pytest.raises(kckpt.errors.CheckpointReadError, match="checksum mismatch"):
      ckpt.restore(state, step=1, donate=False)


def test_checksums_benchmark_measures_the_cpu_time_of_the_hash_thread():
  """`_background_cpu_seconds` counts what runs on kckpt's background thread (here 0.1 s of spinning)."""
  import asyncio
  import time

  from benchmarks import checksums
  from kckpt._orbax import _background

  def spin() -> None:
    start = time.thread_time()
    while time.thread_time() - start < 0.1:
      pass

  asyncio.run(_background.run(spin))  # the thread exists from here on
  before = checksums._background_cpu_seconds()
  asyncio.run(_background.run(spin))
  assert 0.05 <= checksums._background_cpu_seconds() - before < 1.0
