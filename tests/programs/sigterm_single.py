"""Test program: a single-process run gets SIGTERM between two maybe_save calls.

Usage: python -m tests.programs.sigterm_single WORKDIR
Prints ``RESULT {json}`` with what it saw; exits 0 (SIGTERM is recorded, not fatal).
"""

import json
import os
import signal
import sys

import numpy as np

import kckpt
from kckpt import _preemption


def main():
  workdir = sys.argv[1]
  before = signal.getsignal(signal.SIGTERM)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=100, async_save=True)
  saved = {}
  for step in range(1, 50):
    saved[step] = ckpt.maybe_save({"w": np.full(2, float(step))}, step=step)
    if step == 3:
      installed = signal.getsignal(signal.SIGTERM) is not before
      os.kill(os.getpid(), signal.SIGTERM)  # this process: recorded, not fatal
    if ckpt.reached_preemption:
      break
  durable = kckpt.Checkpointer.open(workdir).all_steps
  ckpt.close()
  sys.stdout.write(
    "RESULT "
    + json.dumps(
      {
        "installed": installed,
        "stopped_at": step,
        "saved": [s for s, v in saved.items() if v],
        "durable": durable,
        "restored": signal.getsignal(signal.SIGTERM) is before,
        "forgotten": not _preemption.sigterm_received(),
      }
    )
    + "\n"
  )


if __name__ == "__main__":
  main()
