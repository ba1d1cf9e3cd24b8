"""The `kckpt` command: see, compare, check and clean checkpoints from a shell.

::

  kckpt ls RUN                      steps, times, sizes, items, metrics, why each stays
  kckpt tree RUN [--step STEP]      the saved tree: path, shape, dtype, bytes (metadata only)
  kckpt diff A B                    leaves only in A / only in B, shape and value changes
  kckpt verify RUN [--step STEP]    read every array; check shapes and dtypes
  kckpt gc RUN --max-to-keep N ...  delete what the retention rules would not keep
  kckpt watch RUN                   print each new finished step as it appears
  kckpt export RUN --items params OUT   a weights-only checkpoint

RUN is a workdir, its ``checkpoints/`` folder, or one ``ckpt_<step>`` folder;
STEP is what ``restore(step=...)`` takes: a number, -1 or ``latest``, ``best``
or a tag. Every command is read-only except ``gc`` (deletes) and ``export``
(writes OUT). Tables by default, ``--json`` for scripts. Errors are one line
on stderr and exit 2; ``verify`` exits 1 when it finds a problem, ``diff``
when A and B differ (as ``diff(1)`` does).

This package only parses arguments and renders: one module per command, the
reading itself in `kckpt.inspect`. Built on `argparse`: the standard library
covers sub-commands, help with examples and typed flags, and adds no
dependency to a library that training jobs install.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from kckpt import inspect
from kckpt.cli._common import EXIT_ERROR
from kckpt.cli._common import EXIT_FOUND
from kckpt.cli._common import EXIT_INTERRUPTED
from kckpt.cli._common import EXIT_OK
from kckpt.cli._common import PROG
from kckpt.cli._common import RUN_HELP
from kckpt.errors import CheckpointNotFoundError, CheckpointReadError, CliError, StepAlreadyExistsError

__all__ = ["EXIT_ERROR", "EXIT_FOUND", "EXIT_INTERRUPTED", "EXIT_OK", "PROG", "build_parser", "main"]

# Command -> its module (in this package), which has SUMMARY, EPILOG, add_arguments(parser) and run(args) -> exit status.
COMMANDS = ("ls", "tree", "diff", "verify", "gc", "watch", "export")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
  """The `kckpt` argument parser: one sub-command per module of `COMMANDS`.

  With `only` (a command), that command's alone: its module is the only one
  imported (``kckpt ls`` starts without the others).
  """
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="See, compare, check and clean kckpt / Orbax checkpoints from a shell.",
    epilog="RUN is " + RUN_HELP + ".\nRun 'kckpt COMMAND --help' for a command's flags and examples.\n\n"
    "examples:\n  kckpt ls /tmp/run\n  kckpt tree /tmp/run --step 1000\n  kckpt verify /tmp/run",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  if only is not None and only not in COMMANDS:
    raise ValueError(f"no kckpt command {only!r}; the commands: {', '.join(COMMANDS)}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name in COMMANDS:
    if only is not None and name != only:
      continue
    module = importlib.import_module(f"kckpt.cli.{name}")
    sub = commands.add_parser(
      name,
      help=module.SUMMARY,
      description=module.SUMMARY,
      epilog=module.EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.set_defaults(func=module.run)
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    module.add_arguments(sub)
  return parser


def _quiet_libraries() -> None:
  """Keeps Orbax's and absl's log lines out of the command's output; keeps JAX on the CPU.

  JAX is not imported here: ``ls``, ``watch`` and ``gc`` never import it, and
  the commands that read arrays import it on their first read.
  """
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("kckpt").setLevel(logging.WARNING)
  jax = sys.modules.get("jax")
  if jax is None:
    # Read by JAX when it is imported (later, if a command reads arrays).
    os.environ["JAX_PLATFORMS"] = "cpu"  # the command never needs an accelerator
    return
  try:
    jax.config.update("jax_platforms", "cpu")
  except Exception:  # pylint: disable=broad-exception-caught
    pass  # a backend is already up (main() called from Python): use it


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
  """Drops asyncio's "Task exception was never retrieved" lines.

  When one of the arrays of a batch cannot be read, the read fails with that
  array's error, which the command reports; the reads of the same batch that
  failed too are never awaited, and asyncio logs each of them when it is
  collected, at a moment that depends on the garbage collector.
  """
  return not str(record.msg).startswith("Task exception was never retrieved")


def _drop_closed_loop_noise(unraisable: Any) -> None:
  """Drops a harmless traceback that Python would print after a failed read.

  Orbax 0.12 runs each read on a fresh asyncio loop and closes it; when one
  array fails to read (a corrupted file for `verify`), TensorStore's callbacks
  for the other arrays land on the closed loop.
  """
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
    return
  sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the `kckpt` command; returns its exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
  args = parser.parse_args(argv)
  _quiet_libraries()
  # Left installed: the callbacks may come late, even while the process exits.
  sys.unraisablehook = _drop_closed_loop_noise
  # Left installed too (asyncio logs when the tasks are collected, as late as the process's exit); not under KCKPT_DEBUG.
  if not os.environ.get("KCKPT_DEBUG"):
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)  # a filter is added once
  try:
    return args.func(args)
  except (CliError, CheckpointNotFoundError, CheckpointReadError, StepAlreadyExistsError) as e:
    _print_error(args.command, str(e))
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
  except BrokenPipeError:
    _silence_stdout()
    return EXIT_OK
  except Exception as e:  # pylint: disable=broad-exception-caught
    if os.environ.get("KCKPT_DEBUG"):
      raise
    _print_error(args.command, inspect.short_error(e) + " (KCKPT_DEBUG=1 shows the traceback)")
  return EXIT_ERROR


def _print_error(command: str, message: str) -> None:
  print(f"{PROG} {command}: error: {' '.join(message.split())}", file=sys.stderr)


def _silence_stdout() -> None:
  # Output piped into `head`: the reader left; exit quietly, without a second error at shutdown.
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
  sys.exit(main())
