"""End-to-end tests of the examples: the real scripts, run as subprocesses, small.

* ``train_and_resume.py``: the whole demo (reference run, SIGKILL, resume)
  ends with bit-identical results;
* ``eval_job.py`` beside a live trainer: sees every saved step in order, stops
  on its own after the end marker, and changes nothing in the run's folder.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TIMEOUT = 120  # seconds, for any one subprocess

# A small run: 6 checkpoints, a few seconds of training.
STEPS, SAVE_EVERY = 60, 10
SAVED_STEPS = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))


def _env() -> dict[str, str]:
  return subprocess_env()  # this checkout's kckpt, on the CPU


def _command(script: str, *args: object) -> list[str]:
  return [sys.executable, str(EXAMPLES / script), *map(str, args)]


def run_script(script: str, *args: object) -> subprocess.CompletedProcess:
  """Runs an example to the end (killed after `TIMEOUT` seconds)."""
  return subprocess.run(_command(script, *args), capture_output=True, text=True, timeout=TIMEOUT, env=_env())


def start_script(script: str, *args: object) -> subprocess.Popen:
  """Starts an example in the background; read it with `finish`."""
  return subprocess.Popen(_command(script, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
  """Waits for `proc` (at most `TIMEOUT` seconds, then kills it): status, stdout, stderr."""
  try:
    out, err = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"{proc.args} did not finish in {TIMEOUT} s:\n{out}\n{err}")
  return proc.returncode, out, err


def tree_snapshot(folder: pathlib.Path) -> dict[str, tuple[bool, int, int]]:
  """Every path under `folder` -> (is a folder, size, mtime in ns)."""
  snapshot = {}
  for path in sorted(folder.rglob("*")):
    st = path.stat()
    snapshot[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
  return snapshot


def eval_results(stdout: str) -> list[tuple[int, str]]:
  """The ``eval step N: loss X`` lines of an eval job, as (N, X)."""
  return [(int(s), loss) for s, loss in re.findall(r"^eval step (\d+): loss (\S+)$", stdout, re.M)]


# ---------------------------------------------------------------------------
# train_and_resume.py
# ---------------------------------------------------------------------------


def test_demo_kill_and_resume_gives_identical_results(tmp_path):
  # --step-delay slows the run to be killed (only it) so that the kill lands well before its end.
  proc = run_script(
    "train_and_resume.py",
    "--workdir",
    tmp_path,
    "--steps",
    40,
    "--save-every",
    10,
    "--log-every",
    5,
    "--kill-at",
    25,
    "--step-delay",
    0.05,
  )
  out = proc.stdout
  assert proc.returncode == 0, out + proc.stderr
  # The second run was killed while training, before its end.
  assert re.search(r"SIGKILL sent to pid \d+ after it reported step 25\b", out), out
  assert "killed: exit status -9 (SIGKILL)" in out
  assert "[run] final loss" not in out
  # A new process resumed it from a checkpoint, not from scratch.
  resumed = re.search(r"^\[resumed\] resumed from step (\d+)", out, re.M)
  assert resumed and 0 < int(resumed.group(1)) < 40, out
  # Both runs end with exactly the same loss.
  finals = dict(re.findall(r"^\s*(reference|resumed) run: final loss (\S+) at step 40,", out, re.M))
  assert finals.keys() == {"reference", "resumed"}, out
  assert finals["reference"] == finals["resumed"]
  assert "OK: final losses are identical" in out
  results = [json.loads((tmp_path / d / "final_result.json").read_text()) for d in ("reference", "run")]
  assert results[0] == results[1]
  assert repr(results[0]["final_loss"]) == finals["reference"]


def test_demo_compare_reports_a_difference(monkeypatch):
  monkeypatch.syspath_prepend(str(EXAMPLES))
  import train_and_resume  # pylint: disable=g-import-not-at-top

  same = {"final_step": 3, "final_loss": 0.5, "params_sha256": "ab"}
  assert train_and_resume.compare(same, dict(same)) == 0
  assert train_and_resume.compare(same, {**same, "final_loss": 0.5000001}) == 1


# ---------------------------------------------------------------------------
# eval_job.py
# ---------------------------------------------------------------------------


def test_eval_job_follows_a_live_trainer_read_only(tmp_path):
  workdir, out_file = tmp_path / "run", tmp_path / "eval.jsonl"
  evaluator = start_script("eval_job.py", "--workdir", workdir, "--out", out_file, "--poll-interval", 0.1, "--timeout", 0.5)
  trainer = start_script(
    "train_and_resume.py",
    "--mode",
    "train",
    "--workdir",
    workdir,
    "--steps",
    STEPS,
    "--save-every",
    SAVE_EVERY,
    "--max-to-keep",
    0,
    "--step-delay",
    0.02,
  )
  try:
    code, train_out, train_err = finish(trainer)
    assert code == 0, train_out + train_err
    # The trainer is done: from now on only the eval job could change the folder.
    before = tree_snapshot(workdir / "checkpoints")
    code, eval_out, eval_err = finish(evaluator)  # it must stop on its own
  finally:
    for proc in (trainer, evaluator):
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  assert code == 0, eval_out + eval_err
  assert tree_snapshot(workdir / "checkpoints") == before

  # Every saved step, each once, in order; also written as JSON lines.
  results = eval_results(eval_out)
  assert [s for s, _ in results] == SAVED_STEPS, eval_out + eval_err
  assert f"trainer finished; evaluated {len(SAVED_STEPS)} steps" in eval_out
  lines = [json.loads(line) for line in out_file.read_text().splitlines()]
  assert [r["step"] for r in lines] == SAVED_STEPS
  # The last step evaluated is the trainer's final model.
  final = json.loads((workdir / "final_result.json").read_text())
  assert lines[-1]["eval_loss"] == final["final_loss"]

  # Run again on the finished run: same results, stops by itself, folder untouched.
  rerun = run_script("eval_job.py", "--workdir", workdir, "--poll-interval", 0.1, "--timeout", 0.5)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert eval_results(rerun.stdout) == results
  assert tree_snapshot(workdir / "checkpoints") == before


def test_eval_job_skips_a_step_deleted_after_listing(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.syspath_prepend(str(EXAMPLES))
  import _toy  # pylint: disable=g-import-not-at-top
  import eval_job  # pylint: disable=g-import-not-at-top
  import kckpt  # pylint: disable=g-import-not-at-top

  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, async_save=False) as writer:
    for step in (1, 2):
      writer.save(_toy.initial_state(0), step=step)
  reader = kckpt.Checkpointer.open(tmp_path)
  assert reader.all_steps == [1, 2]  # the listing the watcher saw
  shutil.rmtree(tmp_path / "checkpoints" / "ckpt_1")  # the trainer's retention removes it

  eval_data = _toy.eval_set()
  assert eval_job.evaluate_step(reader, 1, eval_data) is None
  assert "warning: step 1 was deleted before it could be evaluated" in capsys.readouterr().err
  assert isinstance(eval_job.evaluate_step(reader, 2, eval_data), float)
