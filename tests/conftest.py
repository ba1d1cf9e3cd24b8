"""Shared fixtures. Tests run on the CPU with real Orbax and real files."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several CPU devices, so that restoring onto other shardings is tested in-process.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import pytest  # noqa: E402


@pytest.fixture
def workdir(tmp_path):
  """A fresh run folder (not created: kckpt creates it on the first save)."""
  return tmp_path / "run"


def snapshot(path):
  """Every file and folder under `path` with size and mtime: to prove nothing changed."""
  result = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.stat(full)
      result[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return result


# ---------------------------------------------------------------------------
# A local S3 server (moto_server) for the s3:// tests
# ---------------------------------------------------------------------------

S3_BUCKET = "kckpt-test"


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
  """A `moto_server` on 127.0.0.1 with the bucket `S3_BUCKET`, for the whole session.

  Yields the environment variables that point an AWS client at it (endpoint,
  region, dummy credentials, empty AWS config files). The server is killed by
  its pid when the session ends, whether or not tests failed.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  import boto3  # pylint: disable=import-outside-toplevel  (the `test` extra installs moto[server])

  exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
  if not os.path.exists(exe):
    exe = shutil.which("moto_server")
  assert exe, "moto_server not found: install the test extra (pip install -e .[test])"
  port = _free_port()
  logs = tmp_path_factory.mktemp("moto")
  aws_config = logs / "aws_config"
  aws_config.write_text("")
  log = open(logs / "moto.log", "wb")  # noqa: SIM115
  # The server's request recorder (off until a test starts it) lets tests count requests.
  server_env = {**os.environ, "MOTO_ENABLE_RECORDING": "True", "MOTO_RECORDER_FILEPATH": str(logs / "requests.jsonl")}
  proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, env=server_env)
  endpoint = f"http://127.0.0.1:{port}"
  env = {
    "AWS_ENDPOINT_URL": endpoint,
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    # No user AWS config on the test machine leaks in, and the AWS SDK inside
    # TensorStore does not log about missing files.
    "AWS_CONFIG_FILE": str(aws_config),
    "AWS_SHARED_CREDENTIALS_FILE": str(aws_config),
  }
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"moto_server did not start on {endpoint}: see {logs / 'moto.log'}") from None
        time.sleep(0.1)
    boto3.client(
      "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).create_bucket(Bucket=S3_BUCKET)
    yield {"endpoint": endpoint, "bucket": S3_BUCKET, "env": env, "pid": proc.pid}
  finally:
    proc.kill()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def s3_workdir(s3_server, monkeypatch, request):
  """A fresh ``s3://`` run folder on the session's server, with the AWS environment set."""
  import re  # pylint: disable=import-outside-toplevel
  import uuid  # pylint: disable=import-outside-toplevel

  for key, value in s3_server["env"].items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
  monkeypatch.delenv("AWS_PROFILE", raising=False)
  # fsspec reads [, ], * and ? in a path as glob patterns: keep them out of the key.
  name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
  return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"
