"""The benchmark entry points run (on tiny sizes) so they never rot. No timing is asserted."""

import json

from benchmarks import listing


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
