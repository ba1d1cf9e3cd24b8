"""Test program: a training loop that never looks at `reached_preemption` gets SIGTERM at step 12.

Usage: python -m tests.programs.sigterm_loop WORKDIR MODE [KILL_STEP]
MODE: ``default`` (SIGTERM's default action before kckpt), ``handler`` (a Python
handler installed before kckpt, which prints and returns), ``ignored``
(``SIG_IGN`` before kckpt). KILL_STEP (default 12): the step after whose
`maybe_save` the SIGTERM is sent (59: after the last one).
Prints ``STEP n`` for each step trained, ``FINALLY`` from its ``finally`` block
and ``HANDLER`` from the earlier handler; the exit status is the test's subject.
"""

import os
import signal
import sys

import numpy as np

import kckpt


def main():
  workdir, mode = sys.argv[1], sys.argv[2]
  kill_step = int(sys.argv[3]) if len(sys.argv) > 3 else 12
  if mode == "handler":
    signal.signal(signal.SIGTERM, lambda signum, frame: print(f"HANDLER {signum}", flush=True))
  elif mode == "ignored":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  ckpt = kckpt.Checkpointer(workdir=workdir, save_interval_steps=10, async_save=True)
  try:
    for step in range(60):
      print(f"STEP {step}", flush=True)
      ckpt.maybe_save({"w": np.full(2, float(step))}, step=step)
      if step == kill_step:
        os.kill(os.getpid(), signal.SIGTERM)
  finally:
    print("FINALLY", flush=True)
    ckpt.close()


if __name__ == "__main__":
  main()
