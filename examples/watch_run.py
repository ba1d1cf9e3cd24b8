"""Notebook-style polling of a live run: print what changed, cheaply.

Run it next to a trainer (for example `examples/train_and_resume.py --mode train`)
to see new steps as they are finished:

    python examples/watch_run.py --workdir /tmp/my_run --seconds 60

Each poll is one directory listing; the details (time, metrics) of a step are
read once, when it first appears. In a notebook, `kckpt.Checkpointer.open(workdir)`
displays as a table of the newest steps.
"""

from __future__ import annotations

import argparse
import time

import kckpt


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
  parser.add_argument("--poll", type=float, default=0.5, help="seconds between polls")
  args = parser.parse_args(argv)

  ckpt = kckpt.Checkpointer.open(args.workdir)
  print(ckpt.summary(max_rows=3), flush=True)
  seen = set(ckpt.all_steps)
  deadline = time.monotonic() + args.seconds
  while time.monotonic() < deadline and not kckpt.trainer_finished(args.workdir):
    time.sleep(args.poll)
    ckpt.reload()
    for step in ckpt.all_steps:
      if step in seen:
        continue
      seen.add(step)
      try:
        details = ckpt.step_details(step)
      except FileNotFoundError:
        print(f"step {step}: deleted before it could be read", flush=True)
        continue
      print(f"new step {step}: saved {details.time:%H:%M:%S}, metrics {details.metrics}", flush=True)
  ckpt.reload()
  print(f"latest step: {ckpt.latest_step}; finished: {kckpt.trainer_finished(args.workdir)}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
