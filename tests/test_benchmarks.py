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
