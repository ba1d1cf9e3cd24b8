"""Train a toy model with kckpt, SIGKILL it, resume it, and check nothing was lost.

With no arguments, runs the whole story and prints it as it goes:

1. a reference run trains uninterrupted (in a subprocess, in its own workdir);
2. a second run starts in another workdir and is killed with SIGKILL part-way
   (the parent watches its output and kills it by pid; it gets no warning);
3. a new process resumes the second run from its latest checkpoint and
   finishes it;
4. the final losses (and parameters) of both runs are compared: training is
   deterministic on CPU, so they must be bit-identical.

Exit code 0 when they are identical, 1 when they differ, 2 when the demo
itself went wrong (a child failed, or finished before it could be killed).

Usage::

  python examples/train_and_resume.py                     # the demo
  python examples/train_and_resume.py --steps 40 --save-every 10 --kill-at 25
  python examples/train_and_resume.py --mode train --workdir /tmp/run   # start or resume one run

In ``--mode train`` the script is an ordinary training job: it restores the
latest checkpoint of ``--workdir`` if there is one (else starts from scratch),
trains to ``--steps``, saves every ``--save-every`` steps, saves the final
step, waits for the saves, writes the end marker for eval jobs, and writes
its final loss to ``<workdir>/final_result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import _toy  # examples/_toy.py: the model, the data and the checkpoint layout
import kckpt

RESULT_FILE = "final_result.json"
STEP_LINE = re.compile(r"^step (\d+): loss ")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of both modes."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--mode",
    choices=("demo", "train"),
    default="demo",
    help="demo: the whole kill-and-resume story (default); train: one start-or-resume training run",
  )
  p.add_argument("--workdir", help="root folder (default: a fresh temporary folder, removed after a successful demo)")
  p.add_argument("--steps", type=int, default=300, help="number of training steps")
  p.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps")
  p.add_argument("--max-to-keep", type=int, default=3, help="checkpoints kept (0: keep all)")
  p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (and at every save)")
  p.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and of the data")
  p.add_argument(
    "--kill-at", type=int, default=None, help="demo: SIGKILL the run once it reports this step (default: 70%% of --steps)"
  )
  p.add_argument(
    "--step-delay",
    type=float,
    default=None,
    help="seconds to sleep after each step (train mode: default 0; demo: only the run to be killed"
    " sleeps, 0.01 by default, so that the kill lands before it ends)",
  )
  p.add_argument("--child-timeout", type=float, default=300, help="demo: seconds each training subprocess may take")
  args = p.parse_args(argv)
  _check_args(p, args)
  return args


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.steps < 1 or args.save_every < 1 or args.log_every < 1 or args.max_to_keep < 0:
    p.error("--steps, --save-every and --log-every must be >= 1, --max-to-keep >= 0")
  if args.kill_at is None:
    args.kill_at = max(1, args.steps * 7 // 10)
  if args.mode == "demo" and not 0 < args.kill_at < args.steps:
    p.error(f"--kill-at must be between 1 and --steps - 1 ({args.steps - 1}), got {args.kill_at}")
  if args.mode == "train" and not args.workdir:
    p.error("--mode train needs --workdir")


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.mode == "train":
    return train(args)
  return demo(args)


# ---------------------------------------------------------------------------
# Training (one process; started, killed and resumed by the demo)
# ---------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
  """Starts or resumes a run in `args.workdir` and trains it to `args.steps`."""
  ckpt = kckpt.Checkpointer(
    workdir=args.workdir,
    save_interval_steps=args.save_every,
    max_to_keep=args.max_to_keep or None,
    async_save=True,
  )
  state = ckpt.restore(_toy.initial_state(args.seed), noop_if_missing=True)
  start = _report_start(state, ckpt, args)
  if start < args.steps:
    kckpt.clear_end_marker(args.workdir)  # a resumed run is not finished any more
  params, opt_state, data = state.params, state.opt_state, state.data.iterator
  step_delay = args.step_delay or 0.0
  for step in range(start + 1, args.steps + 1):
    x, y = data.next_batch()
    params, opt_state, loss = _toy.train_step(params, opt_state, x, y)
    saved = ckpt.maybe_save(_toy.make_state(params, opt_state, step, data), step=step, metrics={"train_loss": loss})
    if saved or step % args.log_every == 0 or step == args.steps:
      print(f"step {step}: loss {float(loss):.6f}{' (saved)' if saved else ''}", flush=True)
    if step_delay:
      time.sleep(step_delay)
  _finish(ckpt, _toy.make_state(params, opt_state, args.steps, data), args)
  _write_result(args.workdir, params, args.steps)
  return 0


def _report_start(state: kckpt.items.Composite, ckpt: kckpt.Checkpointer, args: argparse.Namespace) -> int:
  """Prints where the run starts; returns the step it starts after."""
  start = int(state.step)
  if start == 0:
    print(f"no checkpoint in {ckpt.directory}: starting from scratch", flush=True)
    return 0
  data = state.data.iterator
  if data.position != start or data.seed != args.seed or start > args.steps:
    raise SystemExit(
      f"checkpoint {start} does not fit this run: data position {data.position}, seed {data.seed}"
      f" (expected {start} <= --steps {args.steps}, seed {args.seed})"
    )
  print(f"resumed from step {start} (checkpoints on disk: {ckpt.all_steps}, data position {data.position})", flush=True)
  return start


def _finish(ckpt: kckpt.Checkpointer, final_state: kckpt.items.Composite, args: argparse.Namespace) -> None:
  """Final save, wait for the background save, release Orbax, tell eval jobs we are done."""
  # force=True: saves even off the interval; a no-op when the step is already saved.
  if ckpt.save(final_state, step=args.steps, force=True):
    print(f"step {args.steps}: final checkpoint saved", flush=True)
  ckpt.wait_until_finished()
  ckpt.close()
  kckpt.write_end_marker(args.workdir, step=args.steps)


def _write_result(workdir: str, params: Any, final_step: int) -> None:
  """Writes and prints the final eval loss and a digest of the parameters."""
  loss = float(_toy.eval_loss(params, *_toy.eval_set()))
  result = {"final_step": final_step, "final_loss": loss, "params_sha256": _toy.params_digest(params)}
  with open(os.path.join(workdir, RESULT_FILE), "w") as f:
    json.dump(result, f)
  print(f"final loss {loss!r} at step {final_step} (params sha256 {result['params_sha256'][:16]}...)", flush=True)


# ---------------------------------------------------------------------------
# The demo (parent process)
# ---------------------------------------------------------------------------


class DemoError(RuntimeError):
  """The demo could not tell its story (a child failed, or was not killed)."""


def demo(args: argparse.Namespace) -> int:
  """Reference run, killed run, resumed run, comparison. Returns the exit code."""
  root = args.workdir or tempfile.mkdtemp(prefix="kckpt-demo-")
  reference_dir, run_dir = os.path.join(root, "reference"), os.path.join(root, "run")
  for d in (reference_dir, run_dir):
    if os.path.exists(d) and os.listdir(d):
      print(f"{d} is not empty: give the demo a fresh --workdir", file=sys.stderr)
      return 2
  print(f"kckpt kill-and-resume demo in {root}: {args.steps} steps, a checkpoint every {args.save_every}")
  env = child_env(root)
  try:
    _banner(f"1/4 reference run, uninterrupted ({reference_dir})")
    run_child(train_command(args, reference_dir), label="reference", env=env, timeout=args.child_timeout)
    _banner(f"2/4 training run, to be killed with SIGKILL once it reports step {args.kill_at} ({run_dir})")
    slow = 0.01 if args.step_delay is None else args.step_delay
    run_and_kill(train_command(args, run_dir, step_delay=slow), kill_at=args.kill_at, env=env, timeout=args.child_timeout)
    show_checkpoints(run_dir)
    _banner("3/4 resume the killed run in a new process")
    run_child(train_command(args, run_dir), label="resumed", env=env, timeout=args.child_timeout)
  except DemoError as e:
    print(f"demo failed: {e}\n(the folders are kept in {root})", file=sys.stderr)
    return 2
  _banner("4/4 compare")
  code = compare(read_result(reference_dir), read_result(run_dir))
  if code == 0 and not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return code


def _banner(text: str) -> None:
  print(f"\n== {text}", flush=True)


def train_command(args: argparse.Namespace, workdir: str, *, step_delay: float = 0) -> list[str]:
  """The command line of a training subprocess (this script, ``--mode train``)."""
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--mode",
    "train",
    "--workdir",
    workdir,
    "--steps",
    str(args.steps),
    "--save-every",
    str(args.save_every),
    "--max-to-keep",
    str(args.max_to_keep),
    "--log-every",
    str(args.log_every),
    "--seed",
    str(args.seed),
  ]
  if step_delay:
    cmd += ["--step-delay", str(step_delay)]
  return cmd


def child_env(root: str) -> dict[str, str]:
  """The environment of the training subprocesses: CPU only, unbuffered output.

  They share a JAX compilation cache under `root`: the three processes run
  the same programs, so only the first one compiles them.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def run_child(
  cmd: list[str],
  *,
  label: str,
  env: dict[str, str],
  timeout: float,
  on_line: Callable[[str, subprocess.Popen], None] | None = None,
) -> int:
  """Runs `cmd`, echoing its output as ``[label] line``; returns its exit status.

  `on_line(line, proc)` is called on each line (the demo kills from there).
  The child is killed if it runs longer than `timeout` seconds.
  """
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  print(f"[{label}] started pid {proc.pid}", flush=True)
  timed_out = threading.Event()

  def kill_on_timeout() -> None:
    timed_out.set()
    proc.kill()

  watchdog = threading.Timer(timeout, kill_on_timeout)
  watchdog.start()
  try:
    for line in proc.stdout:
      line = line.rstrip("\n")
      print(f"[{label}] {line}", flush=True)
      if on_line is not None:
        on_line(line, proc)
    code = proc.wait()
  finally:
    watchdog.cancel()
    proc.stdout.close()
  if timed_out.is_set():
    raise DemoError(f"{label}: no result after {timeout} s; killed")
  if on_line is None and code != 0:
    raise DemoError(f"{label}: exited with status {code}")
  return code


def run_and_kill(cmd: list[str], *, kill_at: int, env: dict[str, str], timeout: float) -> int:
  """Runs a training child and SIGKILLs it once it prints a step >= `kill_at`; returns that step."""
  killed_at = []

  def maybe_kill(line: str, proc: subprocess.Popen) -> None:
    match = STEP_LINE.match(line)
    if match and not killed_at and int(match.group(1)) >= kill_at:
      os.kill(proc.pid, signal.SIGKILL)
      killed_at.append(int(match.group(1)))
      print(
        f"*** SIGKILL sent to pid {proc.pid} after it reported step {killed_at[0]}"
        " (it was still training; no chance to save or clean up)",
        flush=True,
      )

  code = run_child(cmd, label="run", env=env, timeout=timeout, on_line=maybe_kill)
  if not killed_at:
    raise DemoError(f"the run ended (status {code}) before reporting step {kill_at}; it was not killed")
  if code != -signal.SIGKILL:
    raise DemoError(f"the killed run exited with status {code}, not by SIGKILL")
  print(f"killed: exit status {code} (SIGKILL)")
  return killed_at[0]


def show_checkpoints(workdir: str) -> None:
  """Prints what a reader sees in a killed run's folder."""
  ckpt = kckpt.Checkpointer.open(workdir)
  leftovers = sorted(n for n in os.listdir(ckpt.directory) if n.startswith("ckpt_") and "tmp" in n)
  print(
    f"kckpt sees finished steps {ckpt.all_steps} (latest {ckpt.latest_step}); trainer_finished={kckpt.trainer_finished(workdir)}"
  )
  if leftovers:
    print(f"half-written step folders left by the kill (ignored, cleaned up on the next save): {leftovers}")


def read_result(workdir: str) -> dict[str, Any]:
  """The ``final_result.json`` a training run wrote."""
  with open(os.path.join(workdir, RESULT_FILE)) as f:
    return json.load(f)


def compare(reference: dict[str, Any], resumed: dict[str, Any]) -> int:
  """Prints both results; 0 when the final losses are exactly equal, else 1."""
  for name, r in (("reference", reference), ("resumed", resumed)):
    print(f"{name:>9} run: final loss {r['final_loss']!r} at step {r['final_step']}, params sha256 {r['params_sha256'][:16]}...")
  same_loss = reference["final_loss"] == resumed["final_loss"]
  same_params = reference["params_sha256"] == resumed["params_sha256"]
  if same_loss and same_params:
    print("OK: final losses are identical (exact float equality) and the parameters are bit-identical")
    return 0
  print(f"MISMATCH: final losses {'equal' if same_loss else 'differ'}, parameters {'bit-identical' if same_params else 'differ'}")
  return 1


if __name__ == "__main__":
  sys.exit(main())
