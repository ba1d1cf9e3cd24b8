"""A harness for multi-process tests: N local JAX processes that form one cluster.

Each process runs a program (``python -m tests.programs.<name>`` or a script)
with the cluster's coordinates in its environment (read by
`tests.programs._cluster.init`): a free port on 127.0.0.1, its process id,
``XLA_FLAGS=--xla_force_host_platform_device_count=K`` and a shared workdir.
Every process writes its own log; the harness kills them all when the
timeout passes, and a process that exits with an unexpected status fails the
test with its log (and the tail of the others).

    cluster = Cluster(["-m", "tests.programs.multihost_run", "save"], num_processes=4, workdir=tmp_path)
    results = cluster.run()          # start, wait, check exit codes; one dict per process
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import PYTHON, REPO, subprocess_env

RESULT_PREFIX = "RESULT "


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ClusterError(AssertionError):
  """A process of the cluster failed, or the cluster ran past its timeout."""


class Cluster:
  """N processes of one program, started together on a fresh port.

  Args:
    args: the program and its arguments, after ``python``.
    num_processes: how many processes (JAX process ids 0..N-1).
    workdir: shared folder; logs go to ``<workdir>/logs/``, and
      ``KCKPT_TEST_WORKDIR`` points the program at ``<workdir>``.
    devices_per_process: CPU devices in each process.
    timeout: seconds for the whole cluster; then every process is killed.
    env: extra environment variables.
  """

  def __init__(
    self,
    args: Sequence[str],
    *,
    num_processes: int,
    workdir: os.PathLike | str,
    devices_per_process: int = 2,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
  ):
    self.args = [str(a) for a in args]
    self.num_processes = num_processes
    self.workdir = Path(workdir)
    self.devices_per_process = devices_per_process
    self.timeout = timeout
    self.env = dict(env or {})
    self.procs: list[subprocess.Popen] = []
    self.logs: list[Path] = []
    self._deadline = 0.0

  def start(self) -> Cluster:
    log_dir = self.workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    self._deadline = time.monotonic() + self.timeout
    for i in range(self.num_processes):
      env = subprocess_env(
        KCKPT_TEST_COORDINATOR=f"127.0.0.1:{port}",
        KCKPT_TEST_NUM_PROCESSES=self.num_processes,
        KCKPT_TEST_PROCESS_ID=i,
        KCKPT_TEST_WORKDIR=self.workdir,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={self.devices_per_process}",
        **self.env,
      )
      log = log_dir / f"{len(list(log_dir.glob('*.log')))}_p{i}.log"
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen([PYTHON, *self.args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
      self.logs.append(log)
    return self

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def send_signal(self, i: int, sig: int = signal.SIGTERM) -> None:
    self.procs[i].send_signal(sig)

  def wait_for_line(self, i: int, pattern: str) -> re.Match:
    """Waits until process `i` logs a line matching `pattern` (a regex); returns the match."""
    regex = re.compile(pattern, re.M)
    while True:
      match = regex.search(self.log(i))
      if match:
        return match
      if self.procs[i].poll() is not None:
        self.kill()
        raise ClusterError(
          f"process {i} exited (status {self.procs[i].returncode}) before logging {pattern!r}\n{self._report(i)}"
        )
      if time.monotonic() > self._deadline:
        self.kill()
        raise ClusterError(f"process {i} did not log {pattern!r} within {self.timeout} s\n{self._report(i)}")
      time.sleep(0.05)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def wait(self, expect: Mapping[int, int] | None = None) -> list[dict]:
    """Waits for every process; checks exit codes (0 unless `expect` says otherwise).

    Returns, per process, the ``RESULT {json}`` lines it printed, merged in one dict.
    """
    expect = dict(expect or {})
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=max(0.1, self._deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        raise ClusterError(f"process {i} still running after {self.timeout} s: killed\n{self._report(i)}") from None
    for i, p in enumerate(self.procs):
      if p.returncode != expect.get(i, 0):
        raise ClusterError(f"process {i} exited with status {p.returncode}, expected {expect.get(i, 0)}\n{self._report(i)}")
    return [self.results(i) for i in range(self.num_processes)]

  def run(self, expect: Mapping[int, int] | None = None) -> list[dict]:
    """`start` then `wait`."""
    self.start()
    return self.wait(expect)

  def results(self, i: int) -> dict:
    merged = {}
    for line in self.log(i).splitlines():
      if line.startswith(RESULT_PREFIX):
        merged.update(json.loads(line[len(RESULT_PREFIX) :]))
    return merged

  def _report(self, failed: int) -> str:
    parts = [f"==== log of process {failed} ({self.logs[failed]}) ====\n{self.log(failed)}"]
    for i in range(self.num_processes):
      if i != failed:
        parts.append(f"==== tail of process {i} ====\n{self.log(i)[-3000:]}")
    return "\n".join(parts)
