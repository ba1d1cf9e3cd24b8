"""Test program: one process of a run whose data iterators save and resume their own positions.

Usage: python -m tests.programs.data_iterator_run save|restore

Process i of N reads its own shard of a grain dataset (records i, i + N, ...,
shuffled). ``save``: it draws 3 + 2 i records, saves step 1 (params and a
`kckpt.items.DataIterator`), and reports what it drew and the next 4 records.
``restore``: a fresh iterator, step 1 restored into it; reports the next 4.
"""

from __future__ import annotations

import os
import sys

import grain
import numpy as np

import kckpt
from kckpt import items
from tests.programs import _cluster
from tests.programs._cluster import report

RUN = "run"  # in the shared workdir


def shard(process: int, count: int) -> grain.IterDataset:
  return grain.MapDataset.range(100)[process::count].shuffle(seed=7).to_iter_dataset()


def main() -> None:
  scenario = sys.argv[1]
  process, count = _cluster.init()
  data = iter(shard(process, count))
  with kckpt.Checkpointer(workdir=os.path.join(_cluster.workdir(), RUN), save_interval_steps=1) as ckpt:
    if scenario == "save":
      drawn = [int(next(data)) for _ in range(3 + 2 * process)]
      ckpt.save(items.Composite(params={"w": np.ones(2, np.float32)}, data=items.DataIterator(data)), step=1)
      ckpt.wait_until_finished()
      report(drawn=drawn, next=[int(next(data)) for _ in range(4)])
    elif scenario == "restore":
      restored = ckpt.restore(items.Composite(data=items.DataIterator(data)))
      assert restored.data.iterator is data
      report(next=[int(next(data)) for _ in range(4)])
    else:
      raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
  main()
