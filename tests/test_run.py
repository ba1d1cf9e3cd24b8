"""The run index: listing (finished vs temporary folders), step names, per-step details; real folders, no mocks."""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import kckpt
from kckpt import _layout
from kckpt import _run
from kckpt import policies
from kckpt._orbax import _format


@pytest.fixture
def run(tmp_path):
  """Steps 1..4; step 2 tagged 'warm', step 4 tagged 'warm' too; eval.loss lowest at step 3."""
  losses = {1: 0.9, 2: 0.5, 3: 0.1, 4: 0.4}
  with kckpt.Checkpointer(workdir=tmp_path, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step, loss in losses.items():
      ckpt.save({"w": np.full(2, step)}, step=step, metrics={"eval": {"loss": loss}}, tag="warm" if step in (2, 4) else None)
  return _layout.checkpoints_dir(tmp_path)


def test_listing_tells_finished_steps_from_temporary_folders(run):
  (run / "ckpt_9.orbax-checkpoint-tmp-1234").mkdir()
  (run / "ckpt_oops").mkdir()
  (run / "notes.txt").write_text("not a step")
  listing = _run.list_steps(run)
  assert listing.finished == (1, 2, 3, 4)
  assert listing.unfinished == ("ckpt_9.orbax-checkpoint-tmp-1234",)


def test_a_missing_folder_lists_as_no_step(tmp_path):
  assert _run.list_steps(tmp_path / "nowhere") == _run.StepListing()
  assert _run.RunIndex(tmp_path / "nowhere").resolve(-1) is None


def test_every_step_name_resolves(run):
  index = _run.RunIndex(run, retention=policies.RetentionPolicy(best_metric_path="eval.loss", best_mode="min"))
  assert [index.resolve(s) for s in (2, -1, "latest", "best", "warm")] == [2, 4, 4, 3, 4]
  # Without a best metric, "best" is the newest step.
  assert _run.RunIndex(run).resolve("best") == 4


def test_missing_steps_and_tags_are_errors_that_list_the_steps(run):
  index = _run.RunIndex(run)
  with pytest.raises(kckpt.CheckpointNotFoundError, match=r"Step 7 is not in .*steps: \[1, 2, 3, 4\]") as e:
    index.require(7)
  assert e.value.available_steps == (1, 2, 3, 4)
  with pytest.raises(kckpt.CheckpointNotFoundError, match="tag 'cold'"):
    index.require("cold")
  with pytest.raises(ValueError, match="non-negative int"):
    index.resolve(-3)


def test_the_listing_is_cached_until_invalidated(run):
  index = _run.RunIndex(run)
  assert index.finished() == (1, 2, 3, 4)
  _orbax_remove(run, 4)
  assert index.finished() == (1, 2, 3, 4)  # cached
  index.invalidate()
  assert index.finished() == (1, 2, 3)
  assert index.resolve(-1) == 3  # -1 always lists afresh


def _orbax_remove(run, step):
  from kckpt import _orbax  # pylint: disable=import-outside-toplevel

  assert _orbax.remove_step_folder(run, step)


def test_details_read_small_files_only(run):
  details = _run.RunIndex(run).details("warm")
  assert (details.step, details.tag, details.metrics) == (4, "warm", {"eval": {"loss": 0.4}})
  assert details.user_items == ("default",) and details.items["default"] == "pytree"
  assert details.time is not None and details.time.tzinfo is not None
  assert details.record == policies.StepRecord(step=4, time=details.time.timestamp(), metrics={"eval": {"loss": 0.4}})


def test_a_listing_reads_two_small_files_of_a_kckpt_step_and_orbax_metrics_of_others(run, tmp_path, monkeypatch):
  read = []
  real_read = _format._read_json

  def recording_read(folder, *names):
    read.append("/".join(names))
    return real_read(folder, *names)

  monkeypatch.setattr(_format, "_read_json", recording_read)
  # kckpt keeps a copy of the metrics in its step metadata: metadata and health, no metrics file.
  assert _run.read_step_details(run, 3).metrics == {"eval": {"loss": 0.1}}
  assert read == ["_CHECKPOINT_METADATA", "_KCKPT_HEALTH.json"]
  # Steps written by plain Orbax: the metrics come from Orbax's metrics item.
  plain = tmp_path / "plain" / "checkpoints"
  options = ocp.CheckpointManagerOptions(step_prefix="ckpt", best_fn=lambda m: m["loss"])  # Orbax saves metrics only then
  with ocp.CheckpointManager(plain, options=options) as manager:
    manager.save(7, args=ocp.args.Composite(default=ocp.args.PyTreeSave({"w": np.ones(2)})), metrics={"loss": 0.25})
    manager.save(8, args=ocp.args.Composite(default=ocp.args.PyTreeSave({"w": np.ones(2)})))
  read.clear()
  assert _run.read_step_details(plain, 7).metrics == {"loss": 0.25}
  assert "metrics/metrics" in read
  read.clear()
  assert _run.read_step_details(plain, 8).metrics is None  # saved without


@pytest.mark.parametrize("text, spec", [("10", 10), ("-1", -1), ("latest", "latest"), ("best", "best"), ("my-tag", "my-tag")])
def test_step_names_from_a_command_line(text, spec):
  assert _run.parse_step_name(text) == spec


@pytest.mark.parametrize("tag", ["", "latest", "best", "12", "-1"])
def test_tags_that_would_read_as_step_names_are_refused(tag):
  with pytest.raises(ValueError, match="tag must be"):
    _run.check_tag(tag)


def test_a_corrupt_step_metadata_file_is_reported_not_silently_read_as_empty(run, caplog):
  (run / "ckpt_4" / "_CHECKPOINT_METADATA").write_text("garbage{")
  with caplog.at_level("WARNING", logger="kckpt"):
    details = _run.RunIndex(run).details(4)
  assert details.tag is None  # its tag is unknown now ...
  assert any("ckpt_4/_CHECKPOINT_METADATA is not valid JSON" in r.getMessage() for r in caplog.records)  # ... and said so
  assert _run.RunIndex(run).finished() == (1, 2, 3, 4)  # listing keeps working
