"""``kckpt watch RUN``: print each new finished step as it appears (the eval-job poller)."""

from __future__ import annotations

import argparse
import sys
import time

from kckpt import _run
from kckpt import inspect
from kckpt import markers
from kckpt import watch as watch_lib
from kckpt.cli import _common
from kckpt.cli import _format

SUMMARY = "print each new finished step as it appears (the eval-job poller), until interrupted"
EPILOG = """\
Starts with the newest step that exists (--all: every step), then each new one.
--json prints one JSON object per line. Times are in UTC.

examples:
  kckpt watch /tmp/run
  kckpt watch /tmp/run --until-finished --timeout 3600
  kckpt watch /tmp/run --json | while read -r line; do ...; done"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("run", metavar="RUN", help="a workdir or its checkpoints/ folder")
  parser.add_argument(
    "--timeout", type=_common.parse_duration, metavar="DURATION", help="stop after this long without a new step"
  )
  parser.add_argument(
    "--until-finished", action="store_true", help="stop once the trainer wrote its end marker (kckpt.write_end_marker)"
  )
  parser.add_argument("--all", action="store_true", help="print every existing step first, not only the newest")
  parser.add_argument(
    "--interval", type=_common.parse_duration, default=1.0, metavar="SECONDS", help="seconds between two listings (default 1)"
  )


def run(args: argparse.Namespace) -> int:
  location = _common.locate_run(args.run, "watch")
  index = _run.RunIndex(location.checkpoints)
  last_new = time.monotonic()
  end_marker = location.checkpoints / markers.END_MARKER

  def should_stop() -> bool:
    if args.until_finished and end_marker.exists():
      return True
    return args.timeout is not None and time.monotonic() - last_new >= args.timeout

  stop = should_stop if (args.until_finished or args.timeout is not None) else None
  for step in watch_lib.new_steps(
    lambda: index.finished(fresh=True),
    after=-1 if args.all else None,
    timeout_fn=stop,
    poll_interval_secs=args.interval,
  ):
    last_new = time.monotonic()
    try:
      details = _run.read_step_details(location.checkpoints, step)
    except (FileNotFoundError, NotADirectoryError):
      continue  # deleted by the run's retention before we looked
    metrics = inspect.flatten_metrics(details.metrics)
    if args.json:
      _format.print_json(
        {
          "step": step,
          "time": details.time.isoformat() if details.time else None,
          "path": str(details.path),
          "items": list(details.user_items),
          "metrics": metrics,
        },
        indent=None,
      )
    else:
      shown = "  ".join(f"{k}={_format.format_number(v)}" for k, v in metrics.items())
      print(f"step {step}  {inspect.format_time(details.time)}  {','.join(details.user_items)}" + (f"  {shown}" if shown else ""))
    sys.stdout.flush()
  return _common.EXIT_OK
