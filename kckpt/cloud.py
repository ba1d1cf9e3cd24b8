"""Object-store settings: where an ``s3://`` workdir's endpoint, region and credentials come from.

Two layers touch a bucket: TensorStore (the arrays, through Orbax; see
`kckpt._orbax`) and etils' path layer (listings, JSON files, deletes), which
uses fsspec's ``s3fs``. Both are pointed at the same store here:

- endpoint: the override given to `configure_s3` (``Checkpointer.s3_endpoint``),
  else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (the standard AWS
  variables, so MinIO, Cloudflare R2 or any S3-compatible store works), else
  AWS itself;
- region: the override, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``; with
  none of them, TensorStore finds the bucket's own region (on AWS) and
  botocore uses its default chain;
- credentials: always the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and
  ``~/.aws/credentials``), read by both layers themselves.

Overrides are per process (fsspec's configuration is global): one process
talks to one S3 endpoint.

fsspec's listing cache is turned off for ``s3://`` and ``gs://`` (s3fs,
gcsfs): a poller (an eval job) must see steps written by another process, so
every listing asks the store. ``gs://`` needs nothing else here: gcsfs,
google-cloud-storage and TensorStore read Google's own settings (see
docs/guides/cloud-storage.md).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

S3_SCHEME = "s3://"
GCS_SCHEME = "gs://"


@dataclasses.dataclass(frozen=True)
class S3Settings:
  endpoint: str | None = None
  region: str | None = None


_overrides = S3Settings()
_lock = threading.Lock()


def is_s3(path: Any) -> bool:
  return str(path).startswith(S3_SCHEME)


def is_gcs(path: Any) -> bool:
  return str(path).startswith(GCS_SCHEME)


def s3_settings() -> S3Settings:
  """The endpoint and region in effect (overrides first, then the AWS environment)."""
  endpoint = _overrides.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
  region = _overrides.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
  return S3Settings(endpoint=endpoint, region=region)


def configure_s3(*, endpoint: str | None = None, region: str | None = None) -> None:
  """Sets this process's S3 endpoint and/or region, overriding the AWS environment.

  Takes effect for paths opened afterwards (both TensorStore and etils.epath).
  """
  global _overrides
  with _lock:
    new = S3Settings(endpoint=endpoint or _overrides.endpoint, region=region or _overrides.region)
    if new == _overrides:
      return
    _overrides = new
  prepare(S3_SCHEME)


def _apply_fsspec_config() -> None:
  """Points fsspec's ``s3`` file systems (used by etils.epath) at the settings in effect."""
  try:
    import fsspec.config  # pylint: disable=import-outside-toplevel
  except ImportError:  # no cloud extras installed: nothing to configure
    return
  global _applied
  settings = _applied = s3_settings()
  conf = dict(fsspec.config.conf.get("s3", {}))
  conf["use_listings_cache"] = False  # pollers must see other processes' steps
  client_kwargs = dict(conf.get("client_kwargs", {}))
  if settings.endpoint:
    client_kwargs["endpoint_url"] = settings.endpoint
  if settings.region:
    client_kwargs["region_name"] = settings.region
  else:
    client_kwargs.pop("region_name", None)
  conf["client_kwargs"] = client_kwargs
  fsspec.config.conf["s3"] = conf
  try:
    import s3fs  # pylint: disable=import-outside-toplevel

    s3fs.S3FileSystem.clear_instance_cache()  # instances made before now keep their old settings
  except ImportError:
    pass


_applied: S3Settings | None = None


_gcs_prepared = False


def _prepare_gcs() -> None:
  """Turns gcsfs's listing cache off (once; for gcsfs instances made afterwards)."""
  global _gcs_prepared
  with _lock:
    if _gcs_prepared:
      return
    try:
      import fsspec.config  # pylint: disable=import-outside-toplevel
    except ImportError:  # no cloud extras installed: nothing to configure
      return
    conf = dict(fsspec.config.conf.get("gcs", {}))
    conf["use_listings_cache"] = False  # pollers must see other processes' steps (gcsfs caches listings forever)
    fsspec.config.conf["gcs"] = conf
    _gcs_prepared = True


def prepare(path: Any) -> None:
  """Called before kckpt touches `path`: points fsspec at the settings in effect for ``s3://`` (and ``gs://``).

  Cheap when nothing changed (a few environment look-ups).
  """
  if is_gcs(path):
    if not _gcs_prepared:
      _prepare_gcs()
    return
  if not is_s3(path):
    return
  from kckpt import _orbax  # pylint: disable=import-outside-toplevel  # Orbax learns s3:// at the first use

  _orbax.install_s3_support()
  if s3_settings() != _applied:
    with _lock:
      _apply_fsspec_config()


def s3_kvstore_spec(path: str) -> dict[str, Any]:
  """TensorStore's ``s3`` kvstore spec for ``s3://bucket/key/prefix``.

  Raises:
    ValueError: naming `path` when it has no bucket.
  """
  if not is_s3(path):
    raise ValueError(f"Not an s3:// path: {path}")
  bucket, _, key = str(path)[len(S3_SCHEME) :].partition("/")
  if not bucket:
    raise ValueError(f"An s3:// path needs a bucket: {path}")
  settings = s3_settings()
  spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key.lstrip("/")}
  if settings.region:  # else TensorStore asks AWS for the bucket's region (a fixed guess breaks other regions)
    spec["aws_region"] = settings.region
  if settings.endpoint:
    spec["endpoint"] = settings.endpoint
  return spec
