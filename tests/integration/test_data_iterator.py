"""`kckpt.items.DataIterator` in a real 2-process run: each process resumes its own data position."""

from __future__ import annotations

import pytest

import kckpt
from kckpt import items
from tests.multiprocess import Cluster
from tests.programs import data_iterator_run

PROGRAM = ["-m", "tests.programs.data_iterator_run"]


@pytest.mark.slow
def test_each_process_saves_and_resumes_its_own_data_position(tmp_path):
  saved = Cluster([*PROGRAM, "save"], num_processes=2, workdir=tmp_path).run()
  assert [len(r["drawn"]) for r in saved] == [3, 5]
  assert {x % 2 for x in saved[0]["drawn"] + saved[0]["next"]} == {0}  # process 0's shard
  assert {x % 2 for x in saved[1]["drawn"] + saved[1]["next"]} == {1}
  # A restart with as many processes: each goes on from its own position.
  resumed = Cluster([*PROGRAM, "restore"], num_processes=2, workdir=tmp_path).run()
  assert [r["next"] for r in resumed] == [r["next"] for r in saved]
  # The item holds both positions; a restart with another process count (this test: 1) is refused.
  run = kckpt.Checkpointer.open(tmp_path / data_iterator_run.RUN)
  raw = run.restore(items.Composite(data=None)).data
  assert raw["process_count"] == 2 and len(raw["states"]) == 2 and raw["states"][0] != raw["states"][1]
  with pytest.raises(ValueError, match=r"saved by 2 process\(es\), this run has 1"):
    run.restore(items.Composite(data=items.DataIterator(iter(data_iterator_run.shard(0, 1)))))
