"""gs:// workdirs, end to end against a local GCS server (fake-gcs-server, see conftest.gcs_server).

The essential checks of test_s3.py: round trip (sync and async) with
retention, an eval job in another process, a crash in the middle of a save,
the command line; and the writer lock's conditional writes (two writers
racing, refresh, stale takeover, release). Arrays go through Orbax's own GCS
support (TensorStore's ``gcs`` driver, OCDBT on, kckpt's default), listings
and small files through gcsfs, deletes through google-cloud-storage.
"""

import json
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

import kckpt
from kckpt import lock as lock_lib
from tests.helpers import PYTHON, subprocess_env
from tests.integration import object_store


def _client():
  from google.cloud import storage  # pylint: disable=import-outside-toplevel

  return storage.Client()  # STORAGE_EMULATOR_HOST (set by the gcs_workdir fixture): the local server


def _lock_holder(server, checkpoints):
  """The writer lock object's content, read from the server (None: there is none)."""
  name = str(checkpoints / lock_lib.LOCK_FILE)[len(f"gs://{server['bucket']}/") :]
  blob = _client().bucket(server["bucket"]).get_blob(name)
  return None if blob is None else json.loads(blob.download_as_bytes())


def _keys(server, workdir):
  """Every object name under the gs:// `workdir`, asked of the server itself."""
  prefix = workdir[len(f"gs://{server['bucket']}/") :] + "/"
  return sorted(blob.name[len(prefix) :] for blob in _client().list_blobs(server["bucket"], prefix=prefix))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_and_retention(gcs_server, gcs_workdir, async_save):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}, "step": np.int32(0)}
  with kckpt.Checkpointer(workdir=gcs_workdir, save_interval_steps=1, max_to_keep=2, async_save=async_save) as ckpt:
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
  keys = _keys(gcs_server, gcs_workdir)
  steps_present = {k.split("/")[1] for k in keys if k.startswith("checkpoints/ckpt_")}
  assert steps_present == {"ckpt_2", "ckpt_3"}, keys  # retention deleted every object of steps 0 and 1
  # Finished on object storage: written in place, the commit marker last; arrays in OCDBT.
  assert "checkpoints/ckpt_3/commit_success.txt" in keys
  assert [k for k in keys if k.startswith("checkpoints/ckpt_3/") and k.endswith("manifest.ocdbt")], keys
  assert not [k for k in keys if "orbax-checkpoint-tmp" in k or "deleting" in k], keys
  assert "checkpoints/WRITER_LOCK.json" not in keys  # released at close
  reader = kckpt.Checkpointer.open(gcs_workdir)
  assert reader.all_steps == [2, 3]
  np.testing.assert_array_equal(reader.restore(step=2)["params"]["b"], np.full(3, 2.0))
  assert reader.item_metadata()["params"]["w"].shape == (2, 3)


def _log_mark(server):
  """Makes a marker request and returns the log's length once the server has logged it.

  The server writes a request's log line as its handler returns, which can
  be just after the client has the response: the last request of a burst
  may reach the log after the client has moved on (seen once in CI). The
  marker is sent after those requests are answered, so once its line is in
  the log theirs are too, and counting starts after it.
  """
  marker = f"mark-{uuid.uuid4().hex}"
  urllib.request.urlopen(f"{server['endpoint']}/storage/v1/b/{server['bucket']}/o?prefix={marker}", timeout=10).read()
  deadline = time.monotonic() + 30
  while True:
    with open(server["log"], "rb") as f:
      text = f.read()
    at = text.find(marker.encode())
    if at >= 0:
      line_end = text.find(b"\n", at)
      return len(text) if line_end < 0 else line_end + 1
    assert time.monotonic() < deadline, "the server never logged the marker request"
    time.sleep(0.01)


def _requests_since(server, offset):
  """The requests the server logged after byte `offset` (a `_log_mark`), as "METHOD /path?query"."""
  end = _log_mark(server)
  with open(server["log"], "rb") as f:
    f.seek(offset)
    text = f.read(end - offset).decode(errors="replace")
  requests = re.findall(r'\\"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP', text)
  return [f"{method} {url}" for method, url in requests if "/o?prefix=mark-" not in url]


def test_the_last_good_step_is_kept_on_gcs_too(gcs_server, gcs_workdir):
  with kckpt.Checkpointer(workdir=gcs_workdir, save_interval_steps=1, max_to_keep=1) as ckpt:
    ckpt.save({"w": jnp.ones(4)}, step=1)
    for step in (2, 3):
      ckpt.save({"w": jnp.full(4, jnp.nan)}, step=step)
  reader = kckpt.Checkpointer.open(gcs_workdir)
  assert reader.all_steps == [1, 3]  # 2 deleted by max_to_keep; 1 kept as the last good step
  assert not reader.step_details(3).healthy
  np.testing.assert_array_equal(reader.restore({"w": jnp.zeros(4)}, step="last_good")["w"], np.ones(4))


def test_latest_step_poll_is_one_listing(gcs_server, gcs_workdir):
  """A poll asks the server (gcsfs caches listings forever by default: a poller never saw new steps)."""
  with kckpt.Checkpointer(workdir=gcs_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in range(5):
      ckpt.save({"w": np.ones(2)}, step=step)
  reader = kckpt.Checkpointer.open(gcs_workdir)
  assert reader.latest_step == 4  # the first look checks each step's commit marker once
  polls = 5
  offset = _log_mark(gcs_server)  # after the first look's requests (but see below)
  for _ in range(polls):
    reader.reload()
    assert reader.latest_step == 4
  requests = _requests_since(gcs_server, offset)
  prefix = gcs_workdir[len(f"gs://{gcs_server['bucket']}/") :] + "/checkpoints/"

  def is_listing(request):
    method, _, url = request.partition(" ")
    path, _, query = url.partition("?")
    fields = urllib.parse.parse_qs(query)
    return (
      method == "GET"
      and path == f"/storage/v1/b/{gcs_server['bucket']}/o"
      and (fields.get("prefix") == [prefix] and fields.get("delimiter") == ["/"])
    )

  assert sum(map(is_listing, requests)) == polls, requests  # one listing of checkpoints/ per poll, nothing else:
  # the server logs each request as it answers it, concurrently, so the first look's last request may be logged
  # after the marker (seen twice in CI); a poll that made any other request would add one per poll.
  assert sum(not is_listing(r) for r in requests) <= 1, requests


def test_eval_job_in_another_process_sees_every_step(gcs_server, gcs_workdir):
  object_store.eval_job_sees_every_step(gcs_workdir, gcs_server["env"])


def test_kill_during_save_never_exposes_a_partial_step(gcs_server, gcs_workdir):
  object_store.kill_during_save_exposes_no_partial_step(
    gcs_workdir, gcs_server["env"], lambda: _keys(gcs_server, gcs_workdir), lock_stale_secs=1
  )


def test_cli_ls_on_a_gcs_run(gcs_server, gcs_workdir):
  with kckpt.Checkpointer(workdir=gcs_workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in (5, 6):
      ckpt.save({"w": np.ones(4, np.float32)}, step=step, metrics={"loss": step / 10}, tag="release" if step == 6 else None)
  out = subprocess.run(
    [PYTHON, "-m", "kckpt", "ls", gcs_workdir, "--json"],
    capture_output=True,
    text=True,
    env=subprocess_env(**gcs_server["env"]),
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  listing = json.loads(out.stdout)
  assert [row["step"] for row in listing["steps"]] == [5, 6]
  assert listing["steps"][1]["metrics"] == {"loss": 0.6} and listing["steps"][1]["tag"] == "release"
  assert listing["steps"][0]["size_bytes"] > 0 and listing["unfinished"] == []


# -- The writer lock: conditional writes (ifGenerationMatch) -----------------------------------------


def _writer(checkpoints, host, **kwargs):
  lock = lock_lib.WriterLock(checkpoints, **kwargs)
  lock.owner = {**lock.owner, "host": host}  # each a writer on its own host: only the lock object decides
  return lock


def _race(writers, attempt):
  """Runs `attempt(writer)` for every writer at once; returns each one's outcome (None or the error)."""
  start = threading.Barrier(len(writers))
  outcomes = [None] * len(writers)

  def run(i):
    start.wait()
    try:
      attempt(writers[i])
    except kckpt.ConcurrentWriterError as e:
      outcomes[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writers))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  return outcomes


def test_writers_starting_at_once_one_wins(gcs_server, gcs_workdir):
  checkpoints = epath.Path(gcs_workdir) / "checkpoints"
  # The create-if-absent (ifGenerationMatch=0) of six starting writers, all at once.
  writers = [_writer(checkpoints, f"host-{i}") for i in range(6)]
  outcomes = _race(writers, lambda w: w._put(if_match=None))  # pylint: disable=protected-access
  winners = [w for w, e in zip(writers, outcomes, strict=True) if e is None]
  assert len(winners) == 1, outcomes
  assert all("taken by another writer as this one started" in str(e) for e in outcomes if e is not None), outcomes
  assert _lock_holder(gcs_server, checkpoints)["token"] == winners[0].owner["token"]
  # Whole starts, on a fresh workdir: one writer holds it, each other one gets ConcurrentWriterError
  # (it lost the create, or saw the winner refresh its lock for stale_secs).
  checkpoints = checkpoints.parent / "again"
  writers = [_writer(checkpoints, f"host-{i}", stale_secs=2, refresh_secs=0.1) for i in range(4)]
  outcomes = _race(writers, lambda w: w.acquire())
  try:
    winners = [w for w, e in zip(writers, outcomes, strict=True) if e is None]
    assert len(winners) == 1, outcomes
    assert _lock_holder(gcs_server, checkpoints)["token"] == winners[0].owner["token"]
    winners[0].check()
  finally:
    for w in writers:
      w.release()
  assert _lock_holder(gcs_server, checkpoints) is None


def test_refresh_takeover_and_release(gcs_server, gcs_workdir):
  checkpoints = epath.Path(gcs_workdir) / "checkpoints"
  first = _writer(checkpoints, "host-a", stale_secs=2, refresh_secs=0.1)
  first.acquire()
  try:
    # The owner's refreshes replace its own generation (ifGenerationMatch=<the one it wrote>).
    version = first._version  # pylint: disable=protected-access
    deadline = time.monotonic() + 30
    while first._version == version:  # pylint: disable=protected-access
      assert time.monotonic() < deadline, "the lock was never refreshed"
      time.sleep(0.05)
    first.check()
    # A writer on another host is refused while the owner refreshes ...
    second = _writer(checkpoints, "host-b", stale_secs=2, refresh_secs=0.1)
    with pytest.raises(kckpt.ConcurrentWriterError, match="is being written by process .* on host 'host-a'"):
      second.acquire()
    # ... and once the owner stops refreshing (it died), takes over by replacing that very
    # generation; the owner's next check raises, and its refresh of the old generation fails.
    first._stop.set()  # pylint: disable=protected-access
    first._thread.join()  # pylint: disable=protected-access
    dead_version = first._version  # pylint: disable=protected-access
    second.acquire()
    with pytest.raises(kckpt.ConcurrentWriterError, match="taken over by process .* on host 'host-b'"):
      first.check()
    with pytest.raises(kckpt.ConcurrentWriterError, match="created or replaced by another writer"):
      first._put(if_match=dead_version)  # pylint: disable=protected-access
    second.check()
    # Two writers taking over the same stale generation at once: one wins.
    third, fourth = _writer(checkpoints, "host-c"), _writer(checkpoints, "host-d")
    current = second._version  # pylint: disable=protected-access
    outcomes = _race([third, fourth], lambda w: w._put(if_match=current))  # pylint: disable=protected-access
    assert sorted(e is None for e in outcomes) == [False, True], outcomes
    with pytest.raises(kckpt.ConcurrentWriterError):
      second.check()
    winner = third if outcomes[0] is None else fourth
    # Release deletes the winner's lock object; the next writer takes the workdir at once.
    second.release()  # not its lock any more: leaves it alone
    assert _lock_holder(gcs_server, checkpoints)["token"] == winner.owner["token"]
    winner.release()
    assert _lock_holder(gcs_server, checkpoints) is None
    fifth = _writer(checkpoints, "host-e", stale_secs=60)
    fifth.acquire()
    fifth.release()
  finally:
    first.release()
