"""The multi-process benchmark runs (on a tiny state, 1 and 2 processes) so it never rots. No timing is asserted."""

import json

from benchmarks import multihost


def test_multihost_benchmark_runs(tmp_path):
  out = tmp_path / "multihost.json"
  report = multihost.main(
    ["--megabytes", "1", "--processes", "1", "2", "--devices", "2", "--repeats", "1", "--timeout", "120", "--json", str(out)]
  )
  assert [r["processes"] for r in report["results"]] == [1, 2]
  assert [r["devices_per_process"] for r in report["results"]] == [2, 1]
  assert json.loads(out.read_text())["results"][1]["processes"] == 2
  for row in report["results"]:
    for key in ("kckpt_save_s", "kckpt_restore_s", "orbax_save_s", "orbax_restore_s"):
      assert row[key] > 0, (key, row)


def test_tiers_benchmark_runs(tmp_path):
  from benchmarks import tiers  # pylint: disable=import-outside-toplevel

  out = tmp_path / "tiers.json"
  small = ["--megabytes", "1", "--step-size", "64", "--loop-steps", "2"]
  report = tiers.main([*small, "--processes", "1", "2", "--devices", "2", "--repeats", "1", "--json", str(out)])
  assert [r["processes"] for r in report["results"]] == [1, 2]
  assert json.loads(out.read_text())["benchmark"] == "tiers"
  for row in report["results"]:
    for tier in tiers.KINDS:
      for phase in ("blocked", "durable", "restore", "loop_blocked", "loop_left"):
        assert row[f"{tier}_{phase}_s"] > 0, (tier, phase, row)
    assert row["step_s"] > 0
