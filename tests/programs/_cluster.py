"""What a test program started by `tests.multiprocess.Cluster` needs: joining the cluster, reporting."""

from __future__ import annotations

import json
import os
import sys

import jax


def init() -> tuple[int, int]:
  """Joins the cluster described by the environment; returns (process id, process count)."""
  num = int(os.environ.get("KCKPT_TEST_NUM_PROCESSES", "1"))
  pid = int(os.environ.get("KCKPT_TEST_PROCESS_ID", "0"))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num > 1:
    jax.distributed.initialize(coordinator_address=os.environ["KCKPT_TEST_COORDINATOR"], num_processes=num, process_id=pid)
  assert jax.process_count() == num and jax.process_index() == pid
  return pid, num


def workdir() -> str:
  return os.environ["KCKPT_TEST_WORKDIR"]


def report(**values) -> None:
  """Prints ``RESULT {json}``: the harness merges these lines into one dict per process."""
  sys.stdout.write("RESULT " + json.dumps(values) + "\n")  # one write: C++ logs share the stream
  sys.stdout.flush()


def log(*parts) -> None:
  sys.stdout.write(" ".join([f"[p{jax.process_index()}]", *map(str, parts)]) + "\n")
  sys.stdout.flush()
