"""An eval job: evaluates each checkpoint of a training run as it appears.

Runs beside the trainer of ``examples/train_and_resume.py`` (or after it),
opens the run read-only (it never writes or deletes anything in the
workdir), restores only the ``params`` item of each new step, computes the
loss on the fixed eval set, and stops on its own once the trainer has written
its end marker and every step has been evaluated.

Usage::

  python examples/train_and_resume.py --mode train --workdir /tmp/run &
  python examples/eval_job.py --workdir /tmp/run --out /tmp/run_eval.jsonl

Each result is printed as ``eval step N: loss X`` and, with ``--out``,
written as one JSON line ``{"step": N, "eval_loss": X}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

import _toy
import kckpt


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the training run's root folder (it may not exist yet)")
  p.add_argument("--out", help="write the results here as JSON lines (the file is replaced)")
  p.add_argument(
    "--timeout", type=float, default=2.0, help="once the trainer has finished, stop after this many seconds without a new step"
  )
  p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between two listings of the folder")
  p.add_argument(
    "--from-latest", action="store_true", help="start with the newest step present now, instead of every step from the first"
  )
  return p.parse_args(argv)


def watch(ckpt: kckpt.Checkpointer, args: argparse.Namespace) -> Iterator[int]:
  """The steps to evaluate, in order, until the trainer is done."""
  workdir = args.workdir
  return ckpt.iter_new_checkpoints(
    timeout=args.timeout,
    timeout_fn=lambda: kckpt.trainer_finished(workdir),
    poll_interval_secs=args.poll_interval,
    # `after=None` starts at the newest step that exists now; -1 yields every step.
    after=None if args.from_latest else -1,
  )


def evaluate_step(ckpt: kckpt.Checkpointer, step: int, eval_data: tuple[Any, Any]) -> float | None:
  """The eval loss of `step`; None (with a warning) if the step was deleted meanwhile.

  The trainer's `max_to_keep` may delete a step between the listing that
  announced it and this restore (or while it is being read).
  """
  try:
    restored = ckpt.restore(_toy.eval_target(), step=step)
  except FileNotFoundError as e:  # kckpt.CheckpointNotFoundError is one
    _warn_deleted(step, e)
    return None
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Deleted while Orbax was reading it: the error then depends on the file
    # that vanished. Only a step that is gone is skipped; anything else is a bug.
    if _still_exists(ckpt, step):
      raise
    _warn_deleted(step, e)
    return None
  return float(_toy.eval_loss(restored.params, *eval_data))


def _still_exists(ckpt: kckpt.Checkpointer, step: int) -> bool:
  ckpt.reload()
  return step in ckpt.all_steps


def _warn_deleted(step: int, error: BaseException) -> None:
  print(
    f"warning: step {step} was deleted before it could be evaluated (skipped): {type(error).__name__}: {error}",
    file=sys.stderr,
    flush=True,
  )


def report(step: int, loss: float, out: IO[str] | None) -> None:
  """Prints one result and appends it to `out`."""
  print(f"eval step {step}: loss {loss:.6f}", flush=True)
  if out is not None:
    out.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
    out.flush()


def run(args: argparse.Namespace) -> list[int]:
  """Evaluates every new step until the trainer is done; returns the steps evaluated."""
  ckpt = kckpt.Checkpointer.open(args.workdir)
  eval_data = _toy.eval_set()
  evaluated = []
  print(f"watching {ckpt.directory} (read-only)", flush=True)
  with contextlib.ExitStack() as stack:
    out = stack.enter_context(open(args.out, "w")) if args.out else None
    for step in watch(ckpt, args):
      loss = evaluate_step(ckpt, step, eval_data)
      if loss is not None:
        report(step, loss, out)
        evaluated.append(step)
  return evaluated


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  evaluated = run(args)
  print(f"trainer finished; evaluated {len(evaluated)} steps: {evaluated}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
