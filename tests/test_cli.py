"""Tests of the `kckpt` command: the real CLI in subprocesses, on real checkpoints.

Every command runs at least once as ``python -m kckpt`` (and once as the
installed console script); more cases of a command call `kckpt.cli.main` in
this process, which is the same code without the 2 s of importing JAX.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import kckpt
from kckpt import _fs
from kckpt import cli
from kckpt import items
from kckpt.cli import _common
from kckpt.cli import _format
from tests.conftest import snapshot
from tests.helpers import PYTHON, subprocess_env

TIMEOUT = 120  # seconds, for any one subprocess
STEPS = (100, 200, 300, 400)
LOSSES = (0.9, 0.5, 0.7, 0.6)
W_SHIFT = 0.5  # params.dense.w grows by this much from one step to the next


# -- Helpers -------------------------------------------------------------------


def kckpt_cmd(*args) -> list[str]:
  return [PYTHON, "-m", "kckpt", *map(str, args)]


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``python -m kckpt ARGS`` to the end, output captured (so: not a terminal)."""
  return subprocess.run(kckpt_cmd(*args), capture_output=True, text=True, timeout=TIMEOUT, env=subprocess_env(), **kwargs)


def call_cli(capsys, *args) -> tuple[int, str, str]:
  """`kckpt.cli.main(ARGS)` in this process: (exit status, stdout, stderr)."""
  capsys.readouterr()
  try:
    status = cli.main([str(a) for a in args])
  except SystemExit as e:  # argparse: --help, usage errors
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def assert_one_line_error(status, err, *fragments):
  assert status == cli.EXIT_ERROR, err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  for fragment in fragments:
    assert fragment in lines[0]


def run_on_terminal(
  args, *, answer: str | None = None, prompt: str | None = None, python: bool = False, env: dict | None = None
) -> tuple[int, str]:
  """Runs ``python -m kckpt ARGS`` (``python ARGS`` with `python`) with stdin, stdout and stderr on a pseudo-terminal.

  When `prompt` appears in the output, `answer` is typed. Returns the exit
  status and everything the terminal showed.
  """
  leader, follower = pty.openpty()
  command = [PYTHON, *map(str, args)] if python else kckpt_cmd(*args)
  proc = subprocess.Popen(
    command, stdin=follower, stdout=follower, stderr=follower, env={**subprocess_env(), **(env or {})}, close_fds=True
  )
  os.close(follower)
  shown = b""
  deadline = time.monotonic() + TIMEOUT
  try:
    while time.monotonic() < deadline:
      ready, _, _ = select.select([leader], [], [], 0.1)
      if ready:
        try:
          chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
          break
        if not chunk:
          break
        shown += chunk
        if prompt is not None and prompt.encode() in shown and answer is not None:
          os.write(leader, answer.encode())
          answer = None
      elif proc.poll() is not None:
        break
    status = proc.wait(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    os.close(leader)
  return status, shown.decode(errors="replace")


# -- Runs ----------------------------------------------------------------------


def base_params():
  rng = np.random.default_rng(0)
  return {
    "dense": {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)},
    "emb": rng.normal(size=(100, 16)).astype(np.float32),
  }


def params_at(index):
  params = base_params()
  params["dense"]["w"] = params["dense"]["w"] + np.float32(W_SHIFT * index)
  return params


@pytest.fixture(scope="module")
def composite_run(tmp_path_factory):
  """Steps 100..400 of params, opt_state and a JSON item, with metrics; plus a crashed save.

  Shared by the tests that only read it.
  """
  workdir = tmp_path_factory.mktemp("cli") / "run"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=100, max_to_keep=None, async_save=False) as ckpt:
    for i, step in enumerate(STEPS):
      state = items.Composite(
        params=params_at(i),
        opt_state={"mu": np.zeros((64, 32), np.float32), "count": np.int32(step)},
        meta=items.Json({"epoch": i}),
      )
      ckpt.save(state, step=step, metrics={"eval": {"loss": LOSSES[i]}, "lr": 0.001})
  crashed = workdir / "checkpoints" / "ckpt_500.orbax-checkpoint-tmp"
  crashed.mkdir()
  (crashed / "partial").write_text("left by a crash")
  return workdir


def train_state(step, scale=1.0):
  rng = np.random.default_rng(step)
  return {
    "params": {"w": (scale * rng.normal(size=(64, 64))).astype(np.float32), "b": np.zeros(64, np.float32)},
    "opt_state": {"mu": rng.normal(size=(64, 64)).astype(np.float32)},
    "step": np.int32(step),
  }


@pytest.fixture
def single_run(tmp_path):
  """A run that saves one train state (the item ``default``) at steps 1 and 2."""
  workdir = tmp_path / "single"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(train_state(step), step=step)
  return workdir


def copy_run(workdir, tmp_path) -> Path:
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  return copy


# -- Pure helpers ---------------------------------------------------------------


def test_human_bytes_and_durations():
  assert [_format.human_bytes(n) for n in (None, 0, 1023, 1536, 10 * 2**20, 3 * 2**40)] == [
    "-",
    "0 B",
    "1023 B",
    "1.5 KiB",
    "10.0 MiB",
    "3.0 TiB",
  ]
  assert [_common.parse_duration(t) for t in ("90", "1.5", "30m", "2h", "1d")] == [90, 1.5, 1800, 7200, 86400]
  with pytest.raises(Exception, match="duration"):
    _common.parse_duration("soon")


def test_step_arguments_take_what_restore_takes(tmp_path):
  assert [_common.parse_step_arg(t) for t in ("10", "0", "-1", "latest", "best", "my-tag")] == [
    10,
    0,
    -1,
    "latest",
    "best",
    "my-tag",
  ]
  with pytest.raises(Exception, match="a step is"):
    _common.parse_step_arg("-2")
  assert _common.split_run_at_step("/tmp/run@10") == ("/tmp/run", 10)
  assert _common.split_run_at_step("/tmp/run@best") == ("/tmp/run", "best")
  assert _common.split_run_at_step("/tmp/run@-1") == ("/tmp/run", -1)
  assert _common.split_run_at_step("/tmp/a@b/run@my-tag") == ("/tmp/a@b/run", "my-tag")  # the last '@'
  assert _common.split_run_at_step("/tmp/a@b/run") == ("/tmp/a@b/run", None)
  assert _common.split_run_at_step("@20", "/tmp/run@10") == ("/tmp/run", 20)
  assert _common.split_run_at_step("@latest", "/tmp/run") == ("/tmp/run", "latest")
  (tmp_path / "run@v2").mkdir()  # a folder whose name holds an '@' stays a path
  assert _common.split_run_at_step(str(tmp_path / "run@v2")) == (str(tmp_path / "run@v2"), None)


# -- ls ------------------------------------------------------------------------


def test_ls_table_shows_steps_sizes_metrics_and_the_rule_keeping_each(composite_run):
  result = run_cli("ls", composite_run, "--max-to-keep", "2", "--best-metric", "eval.loss", "--best-mode", "min")
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  lines = result.stdout.splitlines()
  header = next(line for line in lines if line.startswith("step"))
  assert "eval.loss*" in header and "lr" in header and "kept by" in header
  rows = {int(line.split()[0]): line for line in lines if re.match(r"^\s*\d+\s", line)}
  assert sorted(rows) == list(STEPS)
  # The best two by eval.loss (min) are 200 (0.5) and 400 (0.6); 400 is also the newest.
  assert rows[200].endswith("best #1") and rows[400].endswith("newest, best #2")
  assert rows[100].endswith("-") and rows[300].endswith("-")
  assert re.search(r"\d+\.\d KiB", rows[100]) and "meta,opt_state,params" in rows[100]
  assert "0.9" in rows[100].split() and "0.001" in rows[100].split()
  assert "unfinished (being written, or left by a crash): ckpt_500.orbax-checkpoint-tmp" in result.stdout
  assert "*: the best metric (min)" in result.stdout


def test_ls_json_and_a_step_folder(composite_run, capsys):
  status, out, _ = call_cli(capsys, "ls", composite_run / "checkpoints", "--json")
  assert status == 0
  report = json.loads(out)
  assert [s["step"] for s in report["steps"]] == list(STEPS)
  assert report["unfinished"] == ["ckpt_500.orbax-checkpoint-tmp"]
  assert report["retention"]["max_to_keep"] is None and not report["retention_from_flags"]  # recorded by the writer
  assert report["retention"]["best_metric_path"] is None and report["retention"]["best_mode"] == "max"
  first = report["steps"][0]
  assert first["metrics"] == {"eval.loss": 0.9, "lr": 0.001}
  assert first["items"] == ["meta", "opt_state", "params"]
  assert first["size_bytes"] > 8 * 1024 and first["keep"] is True and first["kept_by"] == ["latest"]
  assert report["steps"][-1]["kept_by"] == ["newest", "latest"]
  # One step folder: that step only, with the rule computed over the whole run.
  status, out, _ = call_cli(capsys, "ls", composite_run / "checkpoints" / "ckpt_300", "--json", "--max-to-keep", "all")
  report = json.loads(out)
  assert [(s["step"], s["kept_by"]) for s in report["steps"]] == [(300, ["latest"])]


# -- tree ----------------------------------------------------------------------


def test_tree_lists_paths_shapes_dtypes_and_bytes_from_metadata(composite_run):
  result = run_cli("tree", composite_run, "--step", "200")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == f"step 200 of {composite_run / 'checkpoints'}"
  rows = {line.split()[0]: line.split() for line in lines[2:] if not line.startswith("total")}
  assert rows["params/dense.w"][1:] == ["(64,", "32)", "float32", "8.0", "KiB"]
  assert rows["params/dense.b"][1:] == ["(32,)", "float32", "128", "B"]
  assert rows["opt_state/count"][1:] == ["()", "int32", "4", "B"]
  assert rows["meta/<json>"][1:3] == ["-", "json"]
  total_bytes = 64 * 32 * 4 + 32 * 4 + 100 * 16 * 4 + 64 * 32 * 4 + 4
  assert total_bytes == 22916
  assert lines[-1].startswith("total: 5 leaves, 22.4 KiB in memory, ")


def test_tree_json_of_one_item(composite_run, capsys):
  status, out, _ = call_cli(capsys, "tree", composite_run / "checkpoints" / "ckpt_100", "--item", "params", "--json")
  assert status == 0
  report = json.loads(out)
  assert report["step"] == 100 and [i["item"] for i in report["items"]] == ["params"]
  leaves = {leaf["path"]: leaf for leaf in report["items"][0]["leaves"]}
  assert leaves["emb"] == {"path": "emb", "kind": "array", "shape": [100, 16], "dtype": "float32", "bytes": 6400}
  assert report["leaves"] == 3 and report["bytes"] == 64 * 32 * 4 + 32 * 4 + 6400
  status, _, err = call_cli(capsys, "tree", composite_run, "--item", "nope")
  assert_one_line_error(status, err, "no item 'nope'", "meta, opt_state, params")


# -- diff ----------------------------------------------------------------------


def test_diff_of_two_steps_of_one_run(composite_run):
  result = run_cli("diff", f"{composite_run}@100", "@400", "--json")
  assert result.returncode == cli.EXIT_FOUND, result.stderr  # they differ
  report = json.loads(result.stdout)
  assert report["a"]["step"] == 100 and report["b"]["step"] == 400
  changed = {c["leaf"]: c for c in report["changed"]}
  assert sorted(changed) == ["meta/<json>", "opt_state/count", "params/dense.w"]
  w = changed["params/dense.w"]
  assert w["a"] == w["b"] == "(64, 32) float32"
  assert w["max_abs_diff"] == pytest.approx(3 * W_SHIFT, rel=1e-5)
  assert w["max_rel_diff"] == pytest.approx(3 * W_SHIFT / np.abs(params_at(0)["dense"]["w"]).max(), rel=1e-5)
  assert changed["opt_state/count"]["max_abs_diff"] == 300
  assert report["identical"] == 3  # params/dense.b, params/emb, opt_state/mu
  assert report["only_in_a"] == report["only_in_b"] == [] and report["equal"] is False


def test_diff_identical_steps_exit_zero_and_different_runs_list_leaves(composite_run, single_run, capsys):
  step_folder = composite_run / "checkpoints" / "ckpt_300"
  status, out, _ = call_cli(capsys, "diff", f"{composite_run}@300", step_folder)
  assert status == 0
  assert out.splitlines()[-1] == "0 changed, 0 only in A, 0 only in B, 6 identical"
  status, out, _ = call_cli(capsys, "diff", single_run, f"{composite_run}@100")
  assert status == cli.EXIT_FOUND
  assert "only in A: <default item>  pytree" in out and "only in B: params/<item>  pytree" in out
  # Two runs with the same tree: a shape change and value changes, leaf by leaf.
  other = single_run.parent / "other"
  with kckpt.Checkpointer(workdir=other, save_interval_steps=1, async_save=False) as ckpt:
    state = train_state(2, scale=2.0)
    state["opt_state"]["mu"] = np.zeros((8,), np.float32)
    state["extra"] = np.ones(3)
    ckpt.save(state, step=2)
  status, out, _ = call_cli(capsys, "diff", f"{single_run}@2", other, "--json")
  report = json.loads(out)
  changed = {c["leaf"]: c for c in report["changed"]}
  assert changed["opt_state.mu"]["a"] == "(64, 64) float32" and changed["opt_state.mu"]["b"] == "(8,) float32"
  assert changed["opt_state.mu"]["max_abs_diff"] is None
  w = train_state(2)["params"]["w"]
  assert changed["params.w"]["max_abs_diff"] == pytest.approx(np.abs(w).max(), rel=1e-6)  # 2w - w
  assert changed["params.w"]["max_rel_diff"] == pytest.approx(1.0, rel=1e-6)
  assert report["only_in_b"] == [{"leaf": "extra", "spec": "(3,) float64"}]
  assert report["identical"] == 2  # params.b, step


def test_diff_and_verify_read_a_bounded_batch_of_leaves_at_a_time(composite_run, monkeypatch, capsys):
  reads = []
  original_read = kckpt._orbax.LeafReader.read  # pylint: disable=protected-access

  def recording_read(reader, paths):
    reads.append(sum(reader.leaves[p].nbytes for p in paths) if len(paths) > 1 else 0)
    return original_read(reader, paths)

  monkeypatch.setattr(kckpt._orbax.LeafReader, "read", recording_read)  # pylint: disable=protected-access
  # The one batch limit (restores use it too), read at each call: one 64x32 float32 array.
  monkeypatch.setattr(kckpt._orbax, "RESTORE_BATCH_BYTES", 8192)  # pylint: disable=protected-access
  assert call_cli(capsys, "diff", f"{composite_run}@100", "@400")[0] == cli.EXIT_FOUND
  assert call_cli(capsys, "verify", composite_run, "--step", 100)[0] == 0
  assert len(reads) >= 2 * 4 + 3 and max(reads) <= 8192


# -- Step names: best, latest, tags -------------------------------------------


RANKED_LOSSES = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6}  # the best (min) is step 2


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory):
  """Steps 1..4 ranked by eval.loss (min) by their writer, step 3 tagged ``warm-restart``; under a path with an '@'."""
  workdir = tmp_path_factory.mktemp("names") / "team@lab" / "run"
  with kckpt.Checkpointer(
    workdir=workdir, save_interval_steps=1, max_to_keep=None, best_metric_path="eval.loss", best_mode="min", async_save=False
  ) as ckpt:
    for step, loss in RANKED_LOSSES.items():
      state = items.Composite(params={"w": np.full((4, 4), step, np.float32)}, meta=items.Json({"step": step}))
      ckpt.save(state, step=step, metrics={"eval": {"loss": loss}}, tag="warm-restart" if step == 3 else None)
  return workdir


def test_tree_step_best_and_a_tag(ranked_run, capsys):
  status, out, err = call_cli(capsys, "tree", ranked_run, "--step", "best")
  assert status == 0, err
  assert out.splitlines()[0] == f"step 2 of {ranked_run / 'checkpoints'}"  # ranked by the writer's recorded rules
  status, out, err = call_cli(capsys, "tree", ranked_run, "--step", "warm-restart", "--json")
  assert status == 0, err
  assert json.loads(out)["step"] == 3
  for latest in ("latest", "-1"):
    status, out, _ = call_cli(capsys, "tree", ranked_run, "--step", latest, "--json")
    assert json.loads(out)["step"] == 4
  # A step folder and a name for the same step agree; a name for another step is an error.
  status, out, _ = call_cli(capsys, "tree", ranked_run / "checkpoints" / "ckpt_2", "--step", "best", "--json")
  assert status == 0 and json.loads(out)["step"] == 2
  status, _, err = call_cli(capsys, "tree", ranked_run / "checkpoints" / "ckpt_2", "--step", "warm-restart")
  assert_one_line_error(status, err, "is step 2, but --step warm-restart (step 3) was asked for")


def test_unknown_tags_and_bad_step_names_are_one_line_errors(ranked_run, capsys):
  status, _, err = call_cli(capsys, "tree", ranked_run, "--step", "nope")
  assert_one_line_error(status, err, "has the tag 'nope'", "[1, 2, 3, 4]")
  status, _, err = call_cli(capsys, "diff", f"{ranked_run}@nope", "@best")
  assert_one_line_error(status, err, "has the tag 'nope'")
  status, _, err = call_cli(capsys, "verify", ranked_run, "--step", "-3")
  assert status == cli.EXIT_ERROR and "a step is a number >= 0, -1, 'latest', 'best' or a tag" in err


def test_diff_best_against_latest(ranked_run):
  result = run_cli("diff", f"{ranked_run}@best", f"{ranked_run}@latest", "--json")
  assert result.returncode == cli.EXIT_FOUND, result.stderr
  report = json.loads(result.stdout)
  assert (report["a"]["step"], report["b"]["step"]) == (2, 4)
  changed = {c["leaf"]: c for c in report["changed"]}
  assert sorted(changed) == ["meta/<json>", "params/w"]
  assert changed["params/w"]["max_abs_diff"] == 2.0 and changed["params/w"]["max_rel_diff"] == 1.0


def test_steps_by_name_in_verify_export_and_diff_shorthand(ranked_run, tmp_path, capsys):
  status, out, _ = call_cli(capsys, "verify", ranked_run, "--step", "warm-restart")
  assert status == 0 and out.splitlines()[0].startswith("step 3: ok")
  status, out, _ = call_cli(capsys, "diff", f"{ranked_run}@warm-restart", "@3")
  assert status == 0 and out.splitlines()[-1] == "0 changed, 0 only in A, 0 only in B, 2 identical"
  status, out, err = call_cli(capsys, "export", ranked_run, tmp_path / "best", "--step", "best", "--items", "params")
  assert status == 0, err
  assert out.splitlines()[-1] == f"wrote step 2 to {tmp_path / 'best' / 'checkpoints' / 'ckpt_2'}"


# -- verify --------------------------------------------------------------------


def test_verify_reads_every_step_and_is_quiet_when_piped(composite_run):
  before = snapshot(composite_run)
  result = run_cli("verify", composite_run)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stderr == ""  # no progress line: stderr is not a terminal
  lines = result.stdout.splitlines()
  assert 2 * 64 * 32 * 4 + 32 * 4 + 100 * 16 * 4 + 4 == 22916  # w, mu, b, emb, count: 22.4 KiB a step
  assert lines[:4] == [f"step {s}: ok (4 items, 5 leaves, 22.4 KiB, crc32c-shards checksums)" for s in STEPS]
  assert lines[-1] == "OK: 4 steps, 20 leaves, 89.5 KiB read"
  assert snapshot(composite_run) == before  # read-only


def test_commands_take_a_relative_run_path(composite_run, capsys, monkeypatch):
  # Orbax reads only absolute paths: `kckpt verify run` from the run's parent folder failed on every item.
  monkeypatch.chdir(composite_run.parent)
  status, out, err = call_cli(capsys, "verify", composite_run.name, "--step", 100, "--json")
  assert status == 0, out + err
  assert json.loads(out)["steps"][0]["problems"] == []
  status, out, err = call_cli(capsys, "tree", f"{composite_run.name}/checkpoints/ckpt_200", "--item", "params", "--json")
  assert status == 0, err
  assert json.loads(out)["leaves"] == 3
  status, out, err = call_cli(capsys, "diff", f"{composite_run.name}@100", "@200", "--json")
  assert status == cli.EXIT_FOUND, err


def test_verify_reports_a_corrupted_array_file_with_step_item_and_leaf(single_run):
  data_files = list((single_run / "checkpoints" / "ckpt_2" / "default" / "ocdbt.process_0" / "d").iterdir())
  assert data_files
  for path in data_files:  # one file may hold several arrays: cut every file short
    os.truncate(path, 8)
  result = run_cli("verify", single_run)
  assert result.returncode == cli.EXIT_FOUND, result.stdout + result.stderr
  assert result.stderr == ""  # no traceback, no noise from Orbax
  assert "step 1: ok" in result.stdout
  problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
  faulty = {re.match(r"PROBLEM step (\d+), item (\w+), leaf ([\w.]+): unreadable", p).groups() for p in problems}
  assert {("2", "default", "params.w"), ("2", "default", "opt_state.mu")} <= faulty
  assert result.stdout.splitlines()[-1].startswith(f"FAILED: {len(problems)} problem")


def test_verify_json_reports_broken_metadata_json_items_and_non_finite_values(composite_run, single_run, tmp_path, capsys):
  run = copy_run(composite_run, tmp_path)
  step_dir = run / "checkpoints" / "ckpt_200"
  (step_dir / "meta" / "metadata").write_text("{not json")
  for path in (step_dir / "params" / "d").iterdir():  # the item's root of the OCDBT tree
    path.write_bytes(b"\0" * path.stat().st_size)
  status, out, err = call_cli(capsys, "verify", run, "--json")
  assert status == cli.EXIT_FOUND and "Traceback" not in err
  report = json.loads(out)
  where = {(p["step"], p["item"], p["leaf"]) for p in report["problems"]}
  assert where == {(200, "meta", "<json>"), (200, "params", "<metadata>")}
  assert [s["step"] for s in report["steps"] if not s["problems"]] == [100, 300, 400]
  # --check-finite: a NaN weight is a problem only when asked for.
  with kckpt.Checkpointer(workdir=single_run, save_interval_steps=1, async_save=False) as ckpt:
    state = train_state(3)
    state["params"]["b"][5] = np.nan
    ckpt.save(state, step=3)
  assert call_cli(capsys, "verify", single_run, "--step", "3")[0] == 0
  status, out, _ = call_cli(capsys, "verify", single_run, "--step", "3", "--check-finite")
  assert status == cli.EXIT_FOUND
  assert "PROBLEM step 3, item default, leaf params.b: 1 of 64 values are NaN or infinite" in out


def test_verify_shows_progress_on_a_terminal(composite_run):
  status, shown = run_on_terminal(["verify", composite_run])
  assert status == 0, shown
  assert "verify step 400 (4/4)" in shown  # the progress line
  assert "\rverify step 400 (4/4)" in shown  # rewritten in place (tqdm's status line)
  assert "OK: 4 steps" in shown


# -- gc ------------------------------------------------------------------------


def test_gc_dry_run_deletes_nothing_and_explains_each_step(composite_run, capsys):
  before = snapshot(composite_run)
  status, out, _ = call_cli(capsys, "gc", composite_run, "--max-to-keep", "1", "--keep-period", "200", "--dry-run", "--json")
  assert status == 0
  report = json.loads(out)
  decisions = {d["step"]: (d["keep"], d["reasons"]) for d in report["decisions"]}
  assert decisions == {100: (False, []), 200: (True, ["period"]), 300: (False, []), 400: (True, ["newest", "latest", "period"])}
  assert report["to_delete"] == [100, 300] and report["deleted"] == [] and report["bytes_to_free"] > 0
  assert snapshot(composite_run) == before
  # Without flags: the rules the run's writer recorded (here max_to_keep=None: keep all).
  status, out, _ = call_cli(capsys, "gc", composite_run, "--dry-run", "--json")
  assert status == 0 and json.loads(out)["to_delete"] == []
  status, out, _ = call_cli(capsys, "ls", composite_run)
  assert "recorded by the run's writer in RETENTION.json" in out and "max_to_keep=all" in out


def test_gc_without_recorded_rules_needs_flags(composite_run, tmp_path, capsys):
  run = tmp_path / "copy"
  shutil.copytree(composite_run, run)
  (run / "checkpoints" / "RETENTION.json").unlink()
  status, _, err = call_cli(capsys, "gc", run, "--dry-run")
  assert_one_line_error(status, err, "--max-to-keep")


def test_ls_shows_tags(tmp_path, capsys):
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save({"w": np.ones(2)}, step=1, tag="warmup-done")
    ckpt.save({"w": np.ones(2)}, step=2)
  status, out, _ = call_cli(capsys, "ls", tmp_path)
  assert status == 0 and "tag" in out.splitlines()[1] and "warmup-done" in out
  status, out, _ = call_cli(capsys, "ls", tmp_path, "--json")
  assert [s["tag"] for s in json.loads(out)["steps"]] == ["warmup-done", None]


def test_gc_deletes_with_yes_and_refuses_without_a_terminal(composite_run, tmp_path, capsys):
  run = copy_run(composite_run, tmp_path)
  status, _, err = call_cli(capsys, "gc", run, "--max-to-keep", "1")  # stdin is not a terminal here
  assert_one_line_error(status, err, "--yes")
  assert kckpt.Checkpointer.open(run).all_steps == list(STEPS)
  result = run_cli("gc", run, "--max-to-keep", "1", "--best-metric", "eval.loss", "--best-mode", "min", "--yes")
  assert result.returncode == 0, result.stderr
  assert "deleted step 100" in result.stdout and "deleted step 300" in result.stdout
  assert result.stdout.splitlines()[-1].startswith("deleted 2 steps, ")
  ckpt = kckpt.Checkpointer.open(run)
  assert ckpt.all_steps == [200, 400]  # best (0.5) and newest
  names = sorted(p.name for p in (run / "checkpoints").iterdir())
  assert names == ["RETENTION.json", "ckpt_200", "ckpt_400", "ckpt_500.orbax-checkpoint-tmp"]  # nothing left half-deleted
  np.testing.assert_array_equal(
    ckpt.restore(items.Composite(params=None), step=200).params["dense"]["w"], params_at(1)["dense"]["w"]
  )


def test_gc_asks_on_a_terminal(composite_run, tmp_path):
  run = copy_run(composite_run, tmp_path)
  status, shown = run_on_terminal(["gc", run, "--max-to-keep", "3"], prompt="[y/N]", answer="y\n")
  assert status == 0, shown
  assert "Delete 1 step (" in shown and "deleted step 100" in shown
  assert kckpt.Checkpointer.open(run).all_steps == [200, 300, 400]


# -- watch ---------------------------------------------------------------------


def test_watch_prints_each_new_step_until_the_trainer_finishes(tmp_path):
  workdir = tmp_path / "live"
  trainer = kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False)
  trainer.save({"w": np.zeros(3)}, step=1, metrics={"loss": 1.0})
  proc = subprocess.Popen(
    kckpt_cmd("watch", workdir, "--json", "--until-finished", "--timeout", 60, "--interval", 0.1),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=subprocess_env(),
  )
  try:
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "the watcher printed nothing"
    first = json.loads(proc.stdout.readline())  # the watcher is up and saw the existing step
    assert first["step"] == 1 and first["metrics"] == {"loss": 1.0}
    trainer.save({"w": np.ones(3)}, step=2, metrics={"loss": 0.5})
    trainer.save({"w": np.ones(3)}, step=3)
    trainer.close()
    kckpt.write_end_marker(workdir, step=3)
    out, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, err
  later = [json.loads(line) for line in out.splitlines()]
  assert [(s["step"], s["metrics"]) for s in later] == [(2, {"loss": 0.5}), (3, {})]
  assert later[0]["items"] == ["default"] and later[0]["path"].endswith("ckpt_2")


def test_watch_all_with_timeout_stops_and_refuses_a_step_folder(composite_run, capsys):
  start = time.monotonic()
  status, out, _ = call_cli(capsys, "watch", composite_run, "--all", "--timeout", "0.3", "--interval", "0.05")
  assert status == 0 and time.monotonic() - start < 10
  assert [int(line.split()[1]) for line in out.splitlines()] == list(STEPS)
  assert "eval.loss=0.9" in out.splitlines()[0]
  status, _, err = call_cli(capsys, "watch", composite_run / "checkpoints" / "ckpt_100")
  assert_one_line_error(status, err, "whole run")


# -- What each command imports --------------------------------------------------

# etils: `etils.epath` alone is 50 ms of a start (it imports unittest.mock and asyncio).
HEAVY = ("jax", "orbax", "tensorstore", "etils")
# Runs the command in a fresh interpreter, then reports which heavy packages it imported.
_IMPORTS_PROBE = """
import json, sys
from kckpt.cli import main
status = main(sys.argv[1:])
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))
print("IMPORTS " + json.dumps({"status": status, "heavy": heavy, "numpy": "numpy" in sys.modules}), file=sys.stderr)
"""


def run_probed(*args) -> tuple[subprocess.CompletedProcess, dict]:
  """Runs ``kckpt ARGS`` in a new process: its result, and what it imported (see `_IMPORTS_PROBE`)."""
  code = f"HEAVY = {HEAVY!r}\n{_IMPORTS_PROBE}"
  result = subprocess.run(
    [PYTHON, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, env=subprocess_env()
  )
  reports = [line for line in result.stderr.splitlines() if line.startswith("IMPORTS ")]
  assert len(reports) == 1, result.stderr
  return result, json.loads(reports[0].removeprefix("IMPORTS "))


def test_listing_commands_import_no_jax_orbax_tensorstore_or_epath(composite_run, tmp_path):
  run = copy_run(composite_run, tmp_path)
  checkpoints = run / "checkpoints"
  result, imported = run_probed("ls", run)
  assert imported == {"status": 0, "heavy": [], "numpy": False}, result.stderr
  assert result.stdout.startswith(f"{checkpoints}: 4 steps, ") and "ckpt_500.orbax-checkpoint-tmp" in result.stdout
  result, imported = run_probed("ls", checkpoints / "ckpt_300", "--json")
  assert imported["heavy"] == [] and [s["step"] for s in json.loads(result.stdout)["steps"]] == [300]
  result, imported = run_probed("watch", run, "--all", "--json", "--timeout", 0.2, "--interval", 0.05)
  assert imported["heavy"] == [] and [json.loads(line)["step"] for line in result.stdout.splitlines()] == list(STEPS)
  result, imported = run_probed("gc", run, "--max-to-keep", 2, "--dry-run")
  assert imported["heavy"] == [] and "would delete 2 steps" in result.stdout, result.stdout
  result, imported = run_probed("gc", run, "--max-to-keep", 2, "--yes", "--json")
  assert imported["heavy"] == [] and json.loads(result.stdout)["deleted"] == [100, 200]
  assert kckpt.Checkpointer.open(run).all_steps == [300, 400]
  # The probe sees imports: a command that reads arrays imports JAX and Orbax, on the CPU.
  result, imported = run_probed("verify", run)
  assert imported["status"] == 0 and {"jax", "orbax"} <= set(imported["heavy"]), result.stderr


def test_tree_of_a_json_item_imports_no_orbax(composite_run):
  result, imported = run_probed("tree", composite_run, "--item", "meta", "--json")
  assert imported == {"status": 0, "heavy": [], "numpy": False}, result.stderr
  assert json.loads(result.stdout)["items"][0]["item"] == "meta"


def test_ls_lists_the_checkpoints_folder_once(composite_run, capsys, monkeypatch):
  listed = []
  list_names = _fs.list_names

  def counting_list_names(directory):
    listed.append(str(directory))
    return list_names(directory)

  monkeypatch.setattr(_fs, "list_names", counting_list_names)
  status, out, _ = call_cli(capsys, "ls", composite_run)
  assert status == 0 and "4 steps" in out
  assert listed == [str(composite_run / "checkpoints")]
  listed.clear()
  status, out, _ = call_cli(capsys, "ls", composite_run / "checkpoints" / "ckpt_200", "--json")
  assert status == 0 and [s["step"] for s in json.loads(out)["steps"]] == [200]
  assert listed == [str(composite_run / "checkpoints")]


# -- export --------------------------------------------------------------------


def test_export_writes_weights_that_kckpt_and_plain_orbax_read(composite_run, tmp_path):
  out = tmp_path / "weights"
  result = run_cli("export", composite_run, "--step", "300", "--items", "params", out)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  assert result.stdout.splitlines()[-1] == f"wrote step 300 to {out / 'checkpoints' / 'ckpt_300'}"
  expected = params_at(2)
  exported = kckpt.Checkpointer.open(out)
  assert exported.all_steps == [300]
  assert exported.step_details(300).user_items == ("params",)  # no optimizer state, no meta
  assert exported.metrics(300) == {"eval": {"loss": 0.7}, "lr": 0.001}
  target = {"dense": {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32)}, "emb": np.zeros((100, 16), np.float32)}
  restored = exported.restore(items.Composite(params=target)).params
  np.testing.assert_array_equal(restored["dense"]["w"], expected["dense"]["w"])
  np.testing.assert_array_equal(restored["emb"], expected["emb"])
  # Plain Orbax, Kauldron's way: a manager on checkpoints/ with the ckpt_ prefix.
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt", create=False, read_only=True)
  with ocp.CheckpointManager(out / "checkpoints", options=options) as manager:
    plain = manager.restore(300, args=ocp.args.Composite(params=ocp.args.PyTreeRestore()))
  np.testing.assert_array_equal(np.asarray(plain["params"]["dense"]["w"]), expected["dense"]["w"])
  # A second export of the same step refuses to overwrite it.
  again = run_cli("export", composite_run, "--step", "300", "--items", "params", out)
  assert_one_line_error(again.returncode, again.stderr, "exists already")


def test_export_a_field_of_a_single_train_state(single_run, tmp_path, capsys):
  out = tmp_path / "weights"
  status, text, err = call_cli(capsys, "export", single_run, "--items", "params", out, "--json")
  assert status == 0, err
  report = json.loads(text)
  assert report["step"] == 2 and report["items"][0]["from"] == "default.params" and report["items"][0]["leaves"] == 2
  params = ocp.PyTreeCheckpointer().restore(out / "checkpoints" / "ckpt_2" / "params")
  np.testing.assert_array_equal(params["w"], train_state(2)["params"]["w"])
  assert sorted(params) == ["b", "w"]
  status, _, err = call_cli(capsys, "export", single_run, "--items", "ema", tmp_path / "x")
  assert_one_line_error(status, err, "no item 'ema'", "opt_state, params, step")


# -- Errors, help, read-only, the console script -------------------------------


def test_errors_are_one_line_for_a_missing_workdir_and_a_missing_step(composite_run, tmp_path):
  missing = run_cli("ls", tmp_path / "nowhere")
  assert_one_line_error(missing.returncode, missing.stderr, "no such folder", "nowhere")
  assert missing.stdout == ""
  no_step = run_cli("diff", f"{composite_run}@100", "@150")
  assert_one_line_error(no_step.returncode, no_step.stderr, "step 150 is not in", "[100, 200, 300, 400]")


@pytest.mark.parametrize("command", ["ls", "tree", "diff", "verify", "gc", "watch", "export"])
def test_every_command_fails_in_one_line_on_a_bad_path(command, tmp_path, capsys):
  args = {
    "diff": [tmp_path / "nowhere", tmp_path / "nowhere"],
    "gc": [tmp_path / "nowhere", "--max-to-keep", "1"],
    "export": [tmp_path / "nowhere", tmp_path / "out", "--items", "params"],
  }.get(command, [tmp_path / "nowhere"])
  status, out, err = call_cli(capsys, command, *args)
  assert_one_line_error(status, err, f"kckpt {command}: error: no such folder")
  assert out == ""
  (tmp_path / "empty").mkdir()
  args = [tmp_path / "empty" if a == tmp_path / "nowhere" else a for a in args]
  status, _, err = call_cli(capsys, command, *args)
  assert_one_line_error(status, err, "is not a kckpt run")


def test_missing_steps_are_one_line_errors(composite_run, capsys):
  for args in (
    ["tree", composite_run, "--step", 7],
    ["verify", composite_run, "--step", 7],
    ["export", composite_run, composite_run.parent / "never", "--step", 7, "--items", "params"],
  ):
    status, _, err = call_cli(capsys, *args)
    assert_one_line_error(status, err, "step 7 is not in")
  assert not (composite_run.parent / "never").exists()


def test_help_has_an_example_for_every_command(capsys):
  result = run_cli("--help")
  assert result.returncode == 0
  for command in ("ls", "tree", "diff", "verify", "gc", "watch", "export"):
    assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
    status, out, _ = call_cli(capsys, command, "--help")
    assert status == 0
    assert f"usage: kckpt {command}" in out
    examples = out.split("examples:")[1]
    assert f"kckpt {command} /tmp/" in examples, command


def test_read_only_commands_change_nothing(composite_run, tmp_path, capsys):
  before = snapshot(composite_run)
  for args in (
    ["ls", composite_run],
    ["tree", composite_run],
    ["diff", f"{composite_run}@100", "@200"],
    ["verify", composite_run, "--step", 100],
    ["gc", composite_run, "--max-to-keep", 1, "--dry-run"],
    ["watch", composite_run, "--timeout", 0.1, "--interval", 0.05],
    ["export", composite_run, tmp_path / "w", "--items", "params"],
  ):
    status, _, err = call_cli(capsys, *args)
    assert status in (0, cli.EXIT_FOUND), (args, err)
  assert snapshot(composite_run) == before


def test_installed_console_script(composite_run):
  script = shutil.which("kckpt", path=str(Path(sys.executable).parent))
  assert script, f"no `kckpt` console script next to {sys.executable}: reinstall the package (pip install -e .)"
  result = subprocess.run(
    [script, "ls", composite_run, "--json"], capture_output=True, text=True, timeout=TIMEOUT, env=subprocess_env()
  )
  assert result.returncode == 0, result.stderr
  assert [s["step"] for s in json.loads(result.stdout)["steps"]] == list(STEPS)


def test_export_of_a_step_saved_with_escaped_keys_restores_the_same_keys(tmp_path, capsys):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  run, out = tmp_path / "run", tmp_path / "out"
  with kckpt.Checkpointer(workdir=run, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(items.Composite(params={"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}), step=1)
  status, _, err = call_cli(capsys, "export", run, "--step", "1", "--items", "params", out)
  assert status == 0, err
  back = kckpt.Checkpointer.open(out).restore(items.Composite(params={"a.b": np.zeros(2), "a": {"b": np.zeros(2)}}))
  np.testing.assert_array_equal(back.params["a.b"], np.ones(2))
  np.testing.assert_array_equal(back.params["a"]["b"], np.zeros(2))


# -- export --format safetensors ------------------------------------------------


def test_export_safetensors_holds_the_saved_arrays_by_dotted_path(tmp_path, capsys, monkeypatch):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  from kckpt import _orbax  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  params = {
    "dense": {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32)},
    "emb": rng.normal(size=(100, 16)).astype(jnp.bfloat16),
    "layer.0.scale": np.arange(3, dtype=np.int32),  # a key with dots: its name in the file is the same
    "count": 5,  # a Python scalar: a 0-d array
  }
  head = {"w": rng.normal(size=(16, 4)).astype(np.float32), "on": np.array([True, False])}
  run = tmp_path / "run"
  with kckpt.Checkpointer(workdir=run, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(items.Composite(params=params, head=head, opt_state={"mu": np.zeros(3)}, meta=items.Json({"a": 1})), step=7)
  # Read a few leaves at a time: one read per batch, never the whole item.
  monkeypatch.setattr(_orbax, "RESTORE_BATCH_BYTES", 8 * 1024)
  batches = []
  read = _orbax.LeafReader.read
  monkeypatch.setattr(_orbax.LeafReader, "read", lambda self, paths: batches.append(list(paths)) or read(self, paths))
  out = tmp_path / "model.safetensors"
  status, text, err = call_cli(capsys, "export", run, "--step", "7", "--items", "params", "--format", "safetensors", out)
  assert status == 0, err
  assert text.splitlines()[-1] == f"wrote step 7 to {out}"
  names = ["count", "dense.b", "dense.w", "emb", "layer.0.scale"]
  assert len(batches) > 1 and sorted(p for b in batches for p in b) == names
  with safetensors.safe_open(str(out), framework="numpy") as f:
    assert f.metadata() == {"kckpt_step": "7", "kckpt_run": str(run), "kckpt_item": "params", "kckpt_version": kckpt.__version__}
    assert sorted(f.keys()) == names
    assert f.get_slice("emb").get_dtype() == "BF16"
    np.testing.assert_array_equal(f.get_tensor("dense.w"), params["dense"]["w"])
    np.testing.assert_array_equal(f.get_tensor("dense.b"), params["dense"]["b"])
    np.testing.assert_array_equal(f.get_tensor("layer.0.scale"), params["layer.0.scale"])
    assert f.get_tensor("count").shape == () and f.get_tensor("count").dtype == np.int64 and f.get_tensor("count") == 5
  # safetensors.numpy has no bfloat16 (NumPy has none): the library's JAX API, and the raw bytes.
  with safetensors.safe_open(str(out), framework="flax") as f:
    emb = f.get_tensor("emb")
    assert emb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(emb), params["emb"])
  raw = dict(safetensors.deserialize(out.read_bytes()))
  np.testing.assert_array_equal(np.frombuffer(bytes(raw["emb"]["data"]), jnp.bfloat16).reshape(100, 16), params["emb"])
  # Two items in one file: names start with the item's; the whole file through load_file.
  both = tmp_path / "both.safetensors"
  status, text, err = call_cli(
    capsys, "export", run, "--items", "head", "--items", "opt_state", "--format", "safetensors", both, "--json"
  )
  assert status == 0, err
  assert [(i["item"], i["leaves"]) for i in json.loads(text)["items"]] == [("head", 2), ("opt_state", 1)]
  loaded = safetensors.numpy.load_file(str(both))
  assert sorted(loaded) == ["head.on", "head.w", "opt_state.mu"]
  np.testing.assert_array_equal(loaded["head.w"], head["w"])
  np.testing.assert_array_equal(loaded["head.on"], head["on"])
  with safetensors.safe_open(str(both), framework="numpy") as f:
    assert f.metadata()["kckpt_item"] == "head,opt_state"
  # Never overwrites; a JSON item is refused and leaves nothing behind.
  status, _, err = call_cli(capsys, "export", run, "--items", "params", "--format", "safetensors", out)
  assert_one_line_error(status, err, "exists already")
  status, _, err = call_cli(capsys, "export", run, "--items", "meta", "--format", "safetensors", tmp_path / "m.safetensors")
  assert_one_line_error(status, err, "item 'meta' of step 7 is JSON")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["both.safetensors", "model.safetensors", "run"]


def test_export_safetensors_of_escaped_keys_uses_real_paths_and_refuses_names_two_leaves_share(tmp_path, capsys):
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  run = tmp_path / "run"
  state = {
    "params": {"x.y": np.ones(2, np.float32), "x": {"z": np.zeros(2, np.float32)}},
    "other": {"a.b": np.ones(1, np.float32), "a": {"b": np.zeros(1, np.float32)}},  # the collision: saved escaped
  }
  with kckpt.Checkpointer(workdir=run, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(state, step=1)
  out = tmp_path / "params.safetensors"
  status, _, err = call_cli(capsys, "export", run, "--items", "params", "--format", "safetensors", out)
  assert status == 0, err
  loaded = safetensors.numpy.load_file(str(out))
  assert sorted(loaded) == ["x.y", "x.z"]
  np.testing.assert_array_equal(loaded["x.y"], np.ones(2))
  np.testing.assert_array_equal(loaded["x.z"], np.zeros(2))
  status, _, err = call_cli(capsys, "export", run, "--items", "other", "--format", "safetensors", tmp_path / "o.safetensors")
  assert_one_line_error(status, err, "other.a.b and other.a\\.b would both be named 'a.b'")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["params.safetensors", "run"]


# -- Progress of saves and restores (the library) --------------------------------------------

SAVE_AND_RESTORE = """
import sys, numpy as np, jax.numpy as jnp, kckpt
state = {f"w{i}": jnp.full((256, 256), float(i)) for i in range(8)}
with kckpt.Checkpointer(workdir=sys.argv[1], save_interval_steps=1, async_save=False) as ckpt:
  ckpt.save(state, step=1)
  out = ckpt.restore({k: jnp.zeros((256, 256)) for k in state})
print("RESTORED", float(out["w7"][0, 0]))
"""


def test_sync_saves_and_restores_show_progress_on_a_terminal_only(tmp_path):
  env = {"KCKPT_PROGRESS_DELAY_SECS": "0"}
  status, shown = run_on_terminal(["-c", SAVE_AND_RESTORE, str(tmp_path / "t")], python=True, env=env)
  assert status == 0, shown
  assert "RESTORED 7.0" in shown
  assert "save step 1" in shown and "restore step 1" in shown  # tqdm bars: bytes, rate, leaves
  assert "/8 leaves" in shown and "B/s" in shown and "2.00M" in shown  # leaves done, rate, total bytes
  piped = subprocess.run(
    [PYTHON, "-c", SAVE_AND_RESTORE, str(tmp_path / "p")], env={**subprocess_env(), **env}, capture_output=True, text=True
  )
  assert piped.returncode == 0 and "RESTORED 7.0" in piped.stdout
  assert "save step" not in piped.stderr and "restore step" not in piped.stderr  # not a terminal: nothing
