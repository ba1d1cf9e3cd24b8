"""A `Checkpointer`'s fields: checking them, what they mean (policies, folder), building one from a mapping."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from etils import epath

from kckpt import _fs
from kckpt import _layout
from kckpt import _local_tier
from kckpt import _orbax
from kckpt import _run
from kckpt import cloud
from kckpt import multihost
from kckpt import policies
from kckpt import storage as storage_lib

if TYPE_CHECKING:
  from kckpt.checkpointer import Checkpointer

log = logging.getLogger("kckpt")


def _check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"Checkpointer.{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check_positive_number(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ValueError(f"Checkpointer.{name} must be a positive number, got {value!r}")


def _as_timedelta(name: str, value: Any) -> datetime.timedelta | None:
  if value is None:
    return None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = datetime.timedelta(seconds=value)
  if not isinstance(value, datetime.timedelta) or value.total_seconds() <= 0:
    raise ValueError(f"Checkpointer.{name} must be a positive datetime.timedelta (or seconds), got {value!r}")
  return value


def validate(ckpt: Checkpointer) -> None:
  """Checks every field (ValueError naming it) and normalises a few in place (frozen: via object.__setattr__)."""
  _check_positive_int("save_interval_steps", ckpt.save_interval_steps)
  _check_positive_int("max_to_keep", ckpt.max_to_keep)
  _check_positive_int("keep_period", ckpt.keep_period)
  _check_positive_int("async_timeout_secs", ckpt.async_timeout_secs)
  object.__setattr__(ckpt, "keep_time_interval", _as_timedelta("keep_time_interval", ckpt.keep_time_interval))
  if ckpt.save_on_steps is not None:
    object.__setattr__(ckpt, "save_on_steps", tuple(sorted({_run.check_step(s) for s in ckpt.save_on_steps})))
  if ckpt.best_mode not in policies.BEST_MODES:
    raise ValueError(f"Checkpointer.best_mode must be one of {policies.BEST_MODES}, got {ckpt.best_mode!r}")
  if ckpt.best_metric_path is not None and (not isinstance(ckpt.best_metric_path, str) or not ckpt.best_metric_path):
    raise ValueError(f"Checkpointer.best_metric_path must be a dotted path like 'eval.loss', got {ckpt.best_metric_path!r}")
  if ckpt.best_metric_path is not None and ckpt.best_fn is not None:
    raise ValueError("Checkpointer: give best_metric_path or best_fn, not both")
  if ckpt.save_interval_secs is not None:
    _check_positive_number("save_interval_secs", ckpt.save_interval_secs)
  _check_positive_number("barrier_timeout_secs", ckpt.barrier_timeout_secs)
  if ckpt.workdir is not None and not isinstance(ckpt.workdir, (str, os.PathLike)):
    raise ValueError(f"Checkpointer.workdir must be a path, got {type(ckpt.workdir).__name__}: {ckpt.workdir!r}")
  if not isinstance(ckpt.storage, storage_lib.StorageOptions):
    raise ValueError(f"Checkpointer.storage must be a kckpt.StorageOptions, got {type(ckpt.storage).__name__}: {ckpt.storage!r}")
  _check_local_tier(ckpt)
  if ckpt.health_fn is not None and not callable(ckpt.health_fn):
    raise ValueError(f"Checkpointer.health_fn must be a function of the metrics or None, got {ckpt.health_fn!r}")


def _check_local_tier(ckpt: Checkpointer) -> None:
  _check_positive_int("local_save_interval_steps", ckpt.local_save_interval_steps)
  _check_positive_int("local_max_to_keep", ckpt.local_max_to_keep, allow_none=False)
  if isinstance(ckpt.local_replicas, bool) or not isinstance(ckpt.local_replicas, int) or ckpt.local_replicas < 0:
    raise ValueError(f"Checkpointer.local_replicas must be an int >= 0, got {ckpt.local_replicas!r}")
  if ckpt.local_workdir is None:
    return
  if not isinstance(ckpt.local_workdir, (str, os.PathLike)) or not _fs.is_local(ckpt.local_workdir):
    raise ValueError(f"Checkpointer.local_workdir must be a path on this machine's disk, got {ckpt.local_workdir!r}")
  if ckpt.local_save_interval_steps is None:
    raise ValueError("Checkpointer.local_workdir needs local_save_interval_steps (how often maybe_save saves there)")


def local_tier(ckpt: Checkpointer) -> _local_tier.LocalTier:
  """The local tier of `ckpt` in this process (its folder made from `local_workdir`)."""
  assert ckpt.local_workdir is not None and ckpt.local_save_interval_steps is not None
  template = os.fspath(ckpt.local_workdir)
  index = str(multihost.process_index())
  folder = template.replace("{process_index}", index) if "{process_index}" in template else f"{template}/process_{index}"
  return _local_tier.LocalTier(
    pathlib.Path(folder).absolute(),
    run=str(_fs.absolute(checkpoints_dir(ckpt))),
    run_id_file=checkpoints_dir(ckpt) / _local_tier.RUN_ID_FILE,
    interval=ckpt.local_save_interval_steps,
    max_to_keep=ckpt.local_max_to_keep,
    replicas=ckpt.local_replicas,
    durable=ckpt.durable,
    timeout_secs=ckpt.barrier_timeout_secs,
  )


def constructor_kwargs(cls: type, config: Mapping[str, Any] | Any) -> dict[str, Any]:
  """`config` (a mapping or a `ConfigDict`) as keyword arguments of `cls`, nested options built."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"Checkpointer.from_config expects a mapping, got {type(config).__name__}")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(config) - known)
  if unknown:
    raise ValueError(f"Checkpointer.from_config: unknown fields {unknown}; the fields are {sorted(known)}")
  kwargs = dict(config)
  mp = kwargs.get("multiprocessing_options")
  if isinstance(mp, Mapping):
    kwargs["multiprocessing_options"] = _orbax.MultiprocessingOptions(**mp)
  if isinstance(kwargs.get("storage"), Mapping):
    kwargs["storage"] = storage_lib.StorageOptions(**kwargs["storage"])
  if "save_on_steps" in kwargs and kwargs["save_on_steps"] is not None:
    kwargs["save_on_steps"] = tuple(kwargs["save_on_steps"])
  return kwargs


def checkpoints_dir(ckpt: Checkpointer) -> epath.Path:
  """``<workdir>/checkpoints``; ValueError while `workdir` is None. Applies the S3 settings first."""
  if ckpt.workdir is None:
    raise ValueError(
      "Checkpointer.workdir is None: bind it before saving or restoring, e.g."
      " `ckpt = dataclasses.replace(ckpt, workdir='/path/to/run')`."
    )
  if ckpt.s3_endpoint or ckpt.s3_region:
    cloud.configure_s3(endpoint=ckpt.s3_endpoint, region=ckpt.s3_region)
  # An `epath.Path`, as before: users call its methods (`copy`, `stat().mtime`...) on `directory` and `step_details().path`.
  return epath.Path(_layout.checkpoints_dir(ckpt.workdir))


def save_policy(ckpt: Checkpointer) -> policies.SavePolicy:
  """When `maybe_save` saves, from the fields."""
  return policies.SavePolicy(
    interval_steps=ckpt.save_interval_steps,
    on_steps=frozenset(ckpt.save_on_steps or ()),
    interval_secs=ckpt.save_interval_secs,
    never_save_step_zero=ckpt.never_save_step_zero,
  )


# The fields that make the retention policy (`retention_policy`).
RETENTION_FIELDS = frozenset({"max_to_keep", "keep_period", "keep_time_interval", "best_metric_path", "best_fn", "best_mode"})


def recorded_retention_fields(workdir: Any) -> dict[str, Any]:
  """The retention fields the writer of the run at `workdir` recorded; {} when none can be read back.

  Runs of plain Orbax or older kckpt record none; a `best_fn` (a Python
  function) cannot be read back; a file that does not parse is ignored.
  """
  try:
    rules = _layout.read_retention_rules(_layout.checkpoints_dir(workdir))
    if not isinstance(rules, dict):
      return {}
    policy = policies.policy_from_rules(rules)
  except (ValueError, TypeError, AttributeError, OSError) as e:
    log.info("The retention rules recorded in %s are not used: %s", workdir, e)
    return {}
  return {
    "max_to_keep": policy.max_to_keep,
    "keep_period": policy.keep_period,
    "keep_time_interval": policy.keep_time_interval_secs,
    "best_metric_path": policy.best_metric_path,
    "best_mode": policy.best_mode,
  }


def open_read_only(cls: type[Checkpointer], workdir: Any, kwargs: dict[str, Any]) -> Checkpointer:
  """`Checkpointer.open`: read-only, with the writer's recorded retention rules unless `kwargs` give some.

  For runs without readable recorded rules (plain Orbax, a `best_fn`), and
  wherever `kwargs` give any rule, kckpt's defaults fill in the rest.
  """
  kwargs.setdefault("save_interval_steps", None)
  recorded = {} if RETENTION_FIELDS & kwargs.keys() else recorded_retention_fields(workdir)
  if recorded:
    try:
      return cls(workdir=workdir, create=False, **recorded, **kwargs)
    except (ValueError, TypeError) as e:  # rules another version wrote, which this one refuses
      log.info("The retention rules recorded in %s are not used: %s", workdir, e)
  return cls(workdir=workdir, create=False, **kwargs)


def retention_policy(ckpt: Checkpointer) -> policies.RetentionPolicy:
  """Which steps stay, from the fields."""
  return policies.RetentionPolicy(
    max_to_keep=ckpt.max_to_keep,
    keep_period=ckpt.keep_period,
    keep_time_interval_secs=policies.timedelta_seconds(ckpt.keep_time_interval),
    best_metric_path=ckpt.best_metric_path,
    best_fn=ckpt.best_fn,
    best_mode=ckpt.best_mode,  # type: ignore[arg-type]
  )
