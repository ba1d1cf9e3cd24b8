"""One training script for 1 or N processes: sharded state, async checkpoints, preemption, resume.

Run it as 4 local JAX processes (a small cluster on this machine: 127.0.0.1,
gloo collectives, 2 CPU devices each), or as a single process::

  python examples/multihost.py --processes 4 --workdir /tmp/kckpt_multihost
  python examples/multihost.py --processes 1 --workdir /tmp/kckpt_single

Run the same command again to resume from the latest checkpoint. Send
SIGTERM to any one process (or to this launcher, which forwards it to all)
and every process saves the current step, even off the interval, and exits
with status 143; the next run resumes from that step. With N processes the
launcher starts N copies of this script in worker mode; on a real cluster,
start one worker per host with ``--coordinator HOST:PORT --num-processes N
--process-id I`` (or ``--coordinator auto`` where JAX detects the cluster).

The model is a parameter vector sharded across every device of every
process, trained with momentum towards a fixed target. Its update uses only
exact float operations, so the final parameters are bit-identical whatever
the number of processes and however often the run was stopped and resumed:
the primary writes their digest to ``<workdir>/result.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

DIM = 1024  # parameters; divisible by every device count used here
LEARNING_RATE = 0.05
MOMENTUM = 0.9
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a scheduler expects from a job it preempted
RESULT_FILE = "result.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--processes", type=int, default=1, help="local processes to start (launcher mode)")
  p.add_argument("--devices-per-process", type=int, default=2, help="CPU devices in each local process")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--save-every", type=int, default=50)
  p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (to watch it)")
  p.add_argument("--timeout", type=float, default=600, help="launcher: kill the workers after this many seconds")
  # Worker mode (set by the launcher, or by the cluster's own launcher).
  p.add_argument("--coordinator", help="HOST:PORT of process 0, or 'auto' to let JAX detect the cluster")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  args = p.parse_args(argv)
  args.workdir = os.path.abspath(args.workdir)  # Orbax wants absolute local paths
  if args.processes < 1 or args.steps < 1 or args.save_every < 1:
    p.error("--processes, --steps and --save-every must be positive")
  return args


# ---------------------------------------------------------------------------
# Training (one process of the run)
# ---------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
  """Trains (or resumes) the run in `args.workdir` up to `args.steps`; returns the exit status."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import kckpt  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator == "auto":
    jax.distributed.initialize()
  elif args.coordinator:
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  me, primary = jax.process_index(), jax.process_index() == 0
  say = lambda text: sys.stdout.write(f"[p{me}] {text}\n")  # one write: C++ logs share the stream

  mesh = Mesh(np.array(jax.devices()), ("d",))
  sharding = NamedSharding(mesh, P("d"))
  index = np.arange(DIM)
  target = jax.make_array_from_callback((DIM,), sharding, lambda i: ((index[i] % 7) - 3).astype(np.float32))

  @jax.jit
  def train_step(w, m, target, step):
    noise = (((step * 7 + jnp.arange(DIM) * 13) % 17) - 8).astype(jnp.float32) * 0.01  # this step's batch
    grad = (w - target + noise) * 2.0
    m = m * MOMENTUM + grad
    return w - m * LEARNING_RATE, m

  zeros = lambda: jax.make_array_from_callback((DIM,), sharding, lambda i: np.zeros(DIM, np.float32)[i])
  state = {"params": {"w": zeros(), "m": zeros()}, "step": np.int64(0)}

  ckpt = kckpt.Checkpointer(workdir=args.workdir, save_interval_steps=args.save_every, max_to_keep=3)
  state = ckpt.restore(state, noop_if_missing=True)  # every process restores its own shards
  start = int(state["step"])
  say(
    f"{'resumed from step ' + str(start) if start else 'starting from scratch'}"
    f" ({jax.process_count()} process(es), {jax.device_count()} devices)"
  )
  w, m = state["params"]["w"], state["params"]["m"]
  for step in range(start + 1, args.steps + 1):
    w, m = train_step(w, m, target, step)
    saved = ckpt.maybe_save({"params": {"w": w, "m": m}, "step": np.int64(step)}, step=step)
    if saved or step % 10 == 0:
      say(f"step {step}{' (saved)' if saved else ''}")
    if ckpt.reached_preemption:  # SIGTERM (or request_preemption) on any process
      say(f"preempted: step {step} is saved; exiting (run again to resume)")
      ckpt.close()
      return EXIT_PREEMPTED
    if args.step_delay:
      time.sleep(args.step_delay)
  ckpt.save({"params": {"w": w, "m": m}, "step": np.int64(args.steps)}, step=args.steps, force=True)
  ckpt.close()
  final = np.asarray(multihost_utils.process_allgather(w, tiled=True))  # every shard, on every process
  if primary:
    loss = float(np.mean((final - (index % 7 - 3)) ** 2))
    result = {"final_step": args.steps, "loss": loss, "params_sha256": hashlib.sha256(final.tobytes()).hexdigest()}
    with open(os.path.join(args.workdir, RESULT_FILE), "w") as f:
      json.dump(result, f)
    kckpt.write_end_marker(args.workdir, step=args.steps)
    say(f"done: step {args.steps}, loss {loss:.6f}, params sha256 {result['params_sha256'][:16]}")
  return 0


# ---------------------------------------------------------------------------
# Launcher: N local processes of this script
# ---------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args: argparse.Namespace) -> int:
  """Starts `args.processes` workers on this machine, prints their output, returns the worst status."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONUNBUFFERED": "1",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}",
  }
  common = [
    "--workdir",
    args.workdir,
    "--steps",
    str(args.steps),
    "--save-every",
    str(args.save_every),
    "--step-delay",
    str(args.step_delay),
    "--coordinator",
    coordinator,
    "--num-processes",
    str(args.processes),
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *common, "--process-id", str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(args.processes)
  ]
  for i, proc in enumerate(procs):
    print(f"[launcher] started process {i} (pid {proc.pid})", flush=True)

  def forward(signum, frame):
    del frame
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)  # a preemption of the launcher preempts every worker

  def pump(proc: subprocess.Popen) -> None:
    for line in proc.stdout:
      if not line.startswith(("WARNING:absl", "I0000", "W0000", "[Gloo]")):
        print(line, end="", flush=True)

  pumps = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
  for t in pumps:
    t.start()
  deadline = time.monotonic() + args.timeout
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      print(f"[launcher] the workers ran past {args.timeout} s: killed", flush=True)
      return 1
  for t in pumps:
    t.join(timeout=5)
  print(f"[launcher] exit statuses {codes}", flush=True)
  if all(c == 0 for c in codes):
    return 0
  if all(c in (0, EXIT_PREEMPTED) for c in codes):
    return EXIT_PREEMPTED
  return next(c for c in codes if c not in (0, EXIT_PREEMPTED)) or 1


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.coordinator or args.processes == 1:
    return train(args)
  return launch(args)


if __name__ == "__main__":
  sys.exit(main())
