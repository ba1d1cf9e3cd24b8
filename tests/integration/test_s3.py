"""s3:// workdirs, end to end against a local S3 server (`moto_server`, see conftest.s3_server).

The same checks as on local disk: round trip (sync and async), retention,
listing from another reader, an eval job in another process, a crash in the
middle of a save, the command line; and the cost of polling in requests.
"""

import base64
import json
import os
import subprocess
import urllib.request

import boto3
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

import kckpt
from kckpt import cloud
from tests.helpers import PYTHON, subprocess_env
from tests.integration import object_store


def _s3_client(server):
  return boto3.client(
    "s3", endpoint_url=server["endpoint"], region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
  )


def _keys(server, workdir):
  """Every object key under the s3:// `workdir`."""
  prefix = workdir[len(f"s3://{server['bucket']}/") :] + "/"
  pages = _s3_client(server).get_paginator("list_objects_v2").paginate(Bucket=server["bucket"], Prefix=prefix)
  return sorted(obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", []))


def test_kvstore_spec_follows_the_aws_environment_and_overrides(s3_workdir, monkeypatch):
  spec = cloud.s3_kvstore_spec("s3://bkt/a/b")
  assert spec == {
    "driver": "s3",
    "bucket": "bkt",
    "path": "a/b",
    "aws_region": "us-east-1",
    "endpoint": os.environ["AWS_ENDPOINT_URL"],
  }
  monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")  # the S3-specific variable wins
  monkeypatch.setenv("AWS_REGION", "eu-west-3")
  assert cloud.s3_kvstore_spec("s3://bkt/a")["endpoint"] == "http://127.0.0.1:1"
  assert cloud.s3_kvstore_spec("s3://bkt/a")["aws_region"] == "eu-west-3"
  with pytest.raises(ValueError, match="s3:///nobucket"):
    cloud.s3_kvstore_spec("s3:///nobucket")
  # No region configured: none is guessed (us-east-1 broke array I/O on buckets elsewhere).
  monkeypatch.delenv("AWS_REGION")
  monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
  assert "aws_region" not in cloud.s3_kvstore_spec("s3://bkt/a")
  assert cloud.s3_settings().region is None
  # Checkpointer options stay hashable (configs compare and hash them).
  ckpt = kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, s3_endpoint="http://h:1", s3_region="r")
  assert hash(ckpt) == hash(
    kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, s3_endpoint="http://h:1", s3_region="r")
  )


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_and_retention(s3_server, s3_workdir, async_save):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}, "step": np.int32(0)}
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, max_to_keep=2, async_save=async_save) as ckpt:
    for step in range(4):
      ckpt.save(
        {**state, "params": {**state["params"], "b": jnp.full(3, float(step))}}, step=step, metrics={"loss": 1.0 / (step + 1)}
      )
    ckpt.wait_until_finished()
    assert ckpt.all_steps == [2, 3] and ckpt.latest_step == 3
    restored = ckpt.restore(state)
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(restored["params"]["b"], np.full(3, 3.0))
  assert isinstance(restored["params"]["w"], jnp.ndarray) and restored["step"] == 0
  keys = _keys(s3_server, s3_workdir)
  steps_present = {k.split("/")[1] for k in keys if k.startswith("checkpoints/ckpt_")}
  assert steps_present == {"ckpt_2", "ckpt_3"}, keys  # retention deleted every object of steps 0 and 1
  assert not [k for k in keys if "deleting" in k], keys
  # Finished on object storage: written in place, the commit marker last.
  assert "checkpoints/ckpt_3/commit_success.txt" in keys
  assert not [k for k in keys if "orbax-checkpoint-tmp" in k], keys
  reader = kckpt.Checkpointer.open(s3_workdir)
  assert reader.all_steps == [2, 3]
  np.testing.assert_array_equal(reader.restore(step=2)["params"]["b"], np.full(3, 2.0))
  assert reader.item_metadata()["params"]["w"].shape == (2, 3)


def test_composite_items_and_delete(s3_workdir):
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(kckpt.items.Composite(params={"w": np.ones(2) * step}, meta=kckpt.items.Json({"step": step})), step=step)
    ckpt.delete(1)
    assert ckpt.all_steps == [2]
  restored = kckpt.Checkpointer.open(s3_workdir).restore(kckpt.items.Composite(meta=kckpt.items.Json(None)))
  assert restored["meta"] == {"step": 2}


def _recorded_requests(server):
  raw = urllib.request.urlopen(f"{server['endpoint']}/moto-api/recorder/download-recording").read().decode()
  requests = [json.loads(line) for line in raw.splitlines() if line.strip()]
  return [r for r in requests if "/moto-api/" not in r["url"]]


def _request_body(request):
  body = request.get("body") or ""
  if request.get("body_encoded"):
    body = base64.b64decode(body).decode(errors="replace")
  return body


def _recorder(server, action):
  urllib.request.urlopen(urllib.request.Request(f"{server['endpoint']}/moto-api/recorder/{action}", method="POST")).read()


def test_latest_step_poll_is_one_listing(s3_server, s3_workdir):
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in range(5):
      ckpt.save({"w": np.ones(2)}, step=step)
  reader = kckpt.Checkpointer.open(s3_workdir)
  assert reader.latest_step == 4  # the first look checks each step's commit marker once
  polls = 5
  _recorder(s3_server, "reset-recording")
  _recorder(s3_server, "start-recording")
  try:
    for _ in range(polls):
      reader.reload()
      assert reader.latest_step == 4
  finally:
    _recorder(s3_server, "stop-recording")
  requests = _recorded_requests(s3_server)
  described = [f"{r['method']} {r['url']}" for r in requests]
  assert len(requests) == polls, described  # one request per poll...
  for r in requests:  # ...and it is a listing of the checkpoints/ prefix
    assert r["method"] == "GET" and "list-type=2" in r["url"] and "delimiter=%2F" in r["url"], described


def test_eval_job_in_another_process_sees_every_step(s3_workdir):
  object_store.eval_job_sees_every_step(s3_workdir, {})


def test_kill_during_save_never_exposes_a_partial_step(s3_server, s3_workdir):
  object_store.kill_during_save_exposes_no_partial_step(s3_workdir, {}, lambda: _keys(s3_server, s3_workdir))


def test_cli_ls_on_an_s3_run(s3_workdir):
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in (5, 6):
      ckpt.save({"w": np.ones(4, np.float32)}, step=step, metrics={"loss": step / 10}, tag="release" if step == 6 else None)
  out = subprocess.run(
    [PYTHON, "-m", "kckpt", "ls", s3_workdir, "--json"], capture_output=True, text=True, env=subprocess_env(), timeout=60
  )
  assert out.returncode == 0, out.stderr
  listing = json.loads(out.stdout)
  assert [row["step"] for row in listing["steps"]] == [5, 6]
  assert listing["steps"][1]["metrics"] == {"loss": 0.6} and listing["steps"][1]["tag"] == "release"
  assert listing["steps"][0]["size_bytes"] > 0 and listing["unfinished"] == []


def test_delete_removes_the_commit_marker_first(s3_server, s3_workdir):
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save({"w": np.ones(2), "v": np.zeros(3)}, step=step)
    _recorder(s3_server, "reset-recording")
    _recorder(s3_server, "start-recording")
    try:
      ckpt.delete(1)
    finally:
      _recorder(s3_server, "stop-recording")
    assert ckpt.all_steps == [2]
  deletes = [
    r for r in _recorded_requests(s3_server) if r["method"] == "DELETE" or (r["method"] == "POST" and "delete" in r["url"])
  ]
  assert deletes, "no delete request was recorded"
  # Listings stop reporting the step before any of its data goes: the first
  # delete (s3fs sends a bulk "?delete" POST) removes the commit marker alone.
  first = _request_body(deletes[0]) + deletes[0]["url"]
  assert "ckpt_1/commit_success.txt" in first and "ckpt_1/default" not in first, first
  assert not [k for k in _keys(s3_server, s3_workdir) if k.startswith("checkpoints/ckpt_1/")]


def test_checkpointer_endpoint_option_overrides_the_environment(s3_server, s3_workdir, monkeypatch):
  monkeypatch.setattr(cloud, "_overrides", cloud.S3Settings())  # restored after the test
  monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
  monkeypatch.setenv("AWS_REGION", "eu-west-3")
  ckpt = kckpt.Checkpointer(
    workdir=s3_workdir, save_interval_steps=1, async_save=False, s3_endpoint=s3_server["endpoint"], s3_region="us-east-1"
  )
  with ckpt:
    ckpt.save({"w": np.arange(3.0)}, step=1)
    assert ckpt.all_steps == [1]
    np.testing.assert_array_equal(ckpt.restore()["w"], np.arange(3.0))
  assert "checkpoints/ckpt_1/commit_success.txt" in _keys(s3_server, s3_workdir)
  # The next kckpt call after this test sees the environment change back and re-points fsspec.


def test_orbax_builds_s3_kvstores_through_the_hook(s3_workdir):
  """Guards the Orbax 0.12.8 internals hooked in kckpt/_orbax/_patches.py (fails loudly after an Orbax change)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  from kckpt._orbax import _commit, _patches  # pylint: disable=import-outside-toplevel

  assert _patches.s3_support_installed()  # installed by the first s3:// path, not at import
  ocdbt = _patches._ts_utils.build_kvstore_tspec("s3://bkt/run/ckpt_1/default", use_ocdbt=True)
  assert ocdbt["driver"] == "ocdbt"
  assert {k: ocdbt["base"][k] for k in ("driver", "bucket", "path")} == {
    "driver": "s3",
    "bucket": "bkt",
    "path": "run/ckpt_1/default",
  }
  plain = _patches._ts_utils.build_kvstore_tspec("s3://bkt/run/ckpt_1/default", "w", use_ocdbt=False)
  assert plain["driver"] == "s3" and plain["path"] == "run/ckpt_1/default/w"
  assert _patches._ts_utils.build_kvstore_tspec("/tmp/x", use_ocdbt=False)["driver"] == "file"  # local paths untouched
  options = _commit.commit_options(epath.Path("s3://bkt/run"), True)
  assert issubclass(options["temporary_path_class"], ocp.path.atomicity.CommitFileTemporaryPath)


def test_a_step_deleted_while_a_reader_restores_it_is_not_found_not_corrupt(s3_server, s3_workdir):
  with kckpt.Checkpointer(workdir=s3_workdir, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"w": jnp.arange(4.0)}, step=1)
  reader = kckpt.Checkpointer.open(s3_workdir)
  assert reader.all_steps == [1]  # listed (and known finished: its marker is not asked for again)
  # A deletion under way, as kckpt's (and Orbax's) deleter does it: the commit marker first, then data.
  client, prefix = _s3_client(s3_server), s3_workdir[len(f"s3://{s3_server['bucket']}/") :] + "/checkpoints/ckpt_1/"
  client.delete_object(Bucket=s3_server["bucket"], Key=prefix + "commit_success.txt")
  for key in [k for k in _keys(s3_server, s3_workdir) if k.startswith("checkpoints/ckpt_1/default/")]:
    client.delete_object(Bucket=s3_server["bucket"], Key=s3_workdir[len(f"s3://{s3_server['bucket']}/") :] + "/" + key)
  with pytest.raises(kckpt.CheckpointNotFoundError, match="deleted .* while it was being restored"):
    reader.restore({"w": jnp.zeros(4)}, step=1)


def test_the_writer_lock_on_s3_is_created_and_taken_over_with_conditional_writes(s3_workdir):
  from etils import epath  # pylint: disable=import-outside-toplevel

  from kckpt import lock as lock_lib  # pylint: disable=import-outside-toplevel

  checkpoints = epath.Path(s3_workdir) / "checkpoints"
  # S3 keeps modification times to the second: a lock is stale after 3 s without a refresh.
  first = lock_lib.WriterLock(checkpoints, stale_secs=3, refresh_secs=0.2)
  first.acquire()
  try:
    # Another host's writer (a different owner) refuses while the first one refreshes ...
    second = lock_lib.WriterLock(checkpoints, stale_secs=3)
    second.owner = {**second.owner, "host": "other-host"}
    with pytest.raises(kckpt.ConcurrentWriterError, match="is being written by process"):
      second.acquire()
    # ... and a creator that lost the race to create the object never thinks it holds it.
    with pytest.raises(kckpt.ConcurrentWriterError, match="taken by another writer"):
      second._put_s3(if_match=None)  # pylint: disable=protected-access  # the create-if-absent a starting writer does
    # Once the first writer stops refreshing (it died), the second takes over by replacing that
    # very version (If-Match); the first one's next refresh fails and its next check raises.
    first._stop.set()  # pylint: disable=protected-access
    first._thread.join()  # pylint: disable=protected-access
    second.acquire()
    with pytest.raises(kckpt.ConcurrentWriterError, match="taken over by process"):
      first.check()
    with pytest.raises(kckpt.ConcurrentWriterError):
      first._put_s3(if_match=first._etag)  # pylint: disable=protected-access  # its refresh: the version it wrote is gone
    second.check()
    second.release()
  finally:
    first.release()
