"""The interface every checkpointer has: `BaseCheckpointer`, and `NoopCheckpointer` that saves nothing.

`kckpt.Checkpointer` (in `kckpt.checkpointer`) implements it with Orbax.
`NoopCheckpointer` is a drop-in for debugging runs and tests: it has every
public method and property of `Checkpointer`, with the same signatures, and
behaves like a run with no step that never saves.

Which calls every process of a multi-process run must make: `save`,
`maybe_save`, `restore`, `wait_until_finished` and `close`. Every other call
is a local read that any process may make alone.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

from etils import epath

from kckpt import policies
from kckpt import telemetry
from kckpt._types import Metrics, Step, StepSpec
from kckpt.errors import CheckpointNotFoundError


class BaseCheckpointer(abc.ABC):
  """The public surface shared by `Checkpointer` and `NoopCheckpointer`."""

  # -- Configuration ------------------------------------------------------------

  def replace(self, **changes: Any) -> Self:
    """``dataclasses.replace(self, **changes)``: a new, unopened checkpointer."""
    return dataclasses.replace(self, **changes)  # type: ignore[type-var]

  @property
  @abc.abstractmethod
  def directory(self) -> epath.Path | None:
    """``<workdir>/checkpoints`` (None for a `NoopCheckpointer`)."""

  @property
  @abc.abstractmethod
  def save_policy(self) -> policies.SavePolicy:
    """When `maybe_save` saves, as a `kckpt.policies.SavePolicy`."""

  @property
  @abc.abstractmethod
  def retention_policy(self) -> policies.RetentionPolicy:
    """Which steps stay, as a `kckpt.policies.RetentionPolicy`."""

  # -- Reading the run (local) ----------------------------------------------------

  @property
  @abc.abstractmethod
  def all_steps(self) -> list[Step]:
    """The finished steps, sorted."""

  @property
  @abc.abstractmethod
  def latest_step(self) -> Step | None:
    """The newest finished step, or None."""

  @property
  def local_steps(self) -> list[Step]:
    """This process's steps in the local tier, sorted ([] without one)."""
    return []

  @property
  @abc.abstractmethod
  def best_step(self) -> Step | None:
    """The best step by the configured metric (the newest without one), or None."""

  @abc.abstractmethod
  def reload(self) -> None:
    """Forgets the cached step list (another process may have written)."""

  @abc.abstractmethod
  def metrics(self, step: StepSpec = -1) -> Mapping[str, Any] | None:
    """The metrics saved with `step` (None when it was saved without)."""

  @abc.abstractmethod
  def step_details(self, step: StepSpec = -1) -> Any:
    """Time, metrics, items and tag of one step (no array read)."""

  @abc.abstractmethod
  def item_metadata(self, step: StepSpec = -1) -> Any:
    """Shapes and dtypes of the saved leaves, read without loading arrays."""

  @abc.abstractmethod
  def tree(self, step: StepSpec = -1) -> Any:
    """The saved trees of one step, leaf by leaf, from metadata (a notebook shows a collapsible tree)."""

  @abc.abstractmethod
  def diff(self, a: StepSpec, b: StepSpec = -1, *, other: Any = None) -> Any:
    """Two steps compared leaf by leaf (a notebook shows a table)."""

  @abc.abstractmethod
  def retention(self) -> list[policies.KeepDecision]:
    """For each finished step, whether the retention rules keep it, and why."""

  @abc.abstractmethod
  def summary(self, *, max_rows: int = 10) -> str:
    """A few lines on the run."""

  @property
  @abc.abstractmethod
  def last_save_stats(self) -> telemetry.TransferStats | None:
    """What the newest save of this instance moved and how long it took."""

  @property
  @abc.abstractmethod
  def last_restore_stats(self) -> telemetry.TransferStats | None:
    """What the newest restore of this instance moved and how long it took."""

  @abc.abstractmethod
  def iter_new_checkpoints(
    self,
    *,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    poll_interval_secs: float = 1.0,
    after: Step | None = None,
    only_newest: bool = False,
  ) -> Iterator[Step]:
    """Yields each new finished step as it appears."""

  # -- Saving (every process) -------------------------------------------------------

  @abc.abstractmethod
  def should_save(self, step: Step) -> bool:
    """Whether `maybe_save` would save at `step` (local)."""

  @abc.abstractmethod
  def save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves `state` as `step`; True when a save was started."""

  @abc.abstractmethod
  def maybe_save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    """Saves when `should_save(step)` or `force`; True when a save was started."""

  @abc.abstractmethod
  def request_preemption(self) -> None:
    """Asks the run to stop at the next `maybe_save`."""

  @property
  @abc.abstractmethod
  def reached_preemption(self) -> bool:
    """True once a preemption was saved: the training loop should exit."""

  @abc.abstractmethod
  def delete(self, step: Step) -> None:
    """Removes one step."""

  @abc.abstractmethod
  def delete_all_steps(self) -> list[Step]:
    """Deletes every step; returns them."""

  @abc.abstractmethod
  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are durable; raises any error they hit."""

  @abc.abstractmethod
  def close(self) -> None:
    """Finishes pending work and releases resources."""

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  # -- Restoring (every process) ------------------------------------------------------

  @abc.abstractmethod
  def restore(
    self,
    state: Any = None,
    *,
    step: StepSpec = -1,
    noop_if_missing: bool = False,
    donate: bool = True,
    partial: bool = False,
  ) -> Any:
    """Restores `state` from a checkpoint."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoopCheckpointer(BaseCheckpointer):
  """A checkpointer that saves nothing: a run with no step, ever.

  `restore` returns `state`, saves return False, listings are empty, and
  reading a step raises `CheckpointNotFoundError` as on an empty run.

  >>> ckpt = NoopCheckpointer()
  >>> ckpt.save({"w": 1}, step=1), ckpt.all_steps, ckpt.restore({"w": 0})
  (False, [], {'w': 0})
  """

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> NoopCheckpointer:
    """A `NoopCheckpointer`, whatever the config (so a config can switch checkpointing off)."""
    del config
    return cls()

  @classmethod
  def open(cls, workdir: Any, **kwargs: Any) -> NoopCheckpointer:
    del workdir, kwargs
    return cls()

  @property
  def directory(self) -> None:
    return None

  @property
  def save_policy(self) -> policies.SavePolicy:
    return policies.SavePolicy()

  @property
  def retention_policy(self) -> policies.RetentionPolicy:
    return policies.RetentionPolicy(max_to_keep=None)

  @property
  def all_steps(self) -> list[Step]:
    return []

  @property
  def latest_step(self) -> None:
    return None

  @property
  def best_step(self) -> None:
    return None

  def reload(self) -> None:
    pass

  def _no_step(self, step: StepSpec) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"NoopCheckpointer saves nothing: there is no step {step!r}")

  def metrics(self, step: StepSpec = -1) -> Mapping[str, Any] | None:
    raise self._no_step(step)

  def step_details(self, step: StepSpec = -1) -> Any:
    raise self._no_step(step)

  def item_metadata(self, step: StepSpec = -1) -> Any:
    raise self._no_step(step)

  def tree(self, step: StepSpec = -1) -> Any:
    raise self._no_step(step)

  def diff(self, a: StepSpec, b: StepSpec = -1, *, other: Any = None) -> Any:
    del b, other
    raise self._no_step(a)

  def retention(self) -> list[policies.KeepDecision]:
    return []

  def summary(self, *, max_rows: int = 10) -> str:
    del max_rows
    return "NoopCheckpointer: saves nothing"

  @property
  def last_save_stats(self) -> None:
    return None

  @property
  def last_restore_stats(self) -> None:
    return None

  def iter_new_checkpoints(
    self,
    *,
    min_interval_secs: float = 0,
    timeout: float | None = None,
    timeout_fn: Callable[[], bool] | None = None,
    poll_interval_secs: float = 1.0,
    after: Step | None = None,
    only_newest: bool = False,
  ) -> Iterator[Step]:
    del min_interval_secs, timeout, timeout_fn, poll_interval_secs, after, only_newest
    yield from ()

  def should_save(self, step: Step) -> bool:
    del step
    return False

  def save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    del state, step, force, metrics, tag, config
    return False

  def maybe_save(
    self,
    state: Any,
    *,
    step: Step,
    force: bool = False,
    metrics: Metrics | None = None,
    tag: str | None = None,
    config: Mapping[str, Any] | None = None,
  ) -> bool:
    del state, step, force, metrics, tag, config
    return False

  def request_preemption(self) -> None:
    pass

  @property
  def reached_preemption(self) -> bool:
    return False

  def delete(self, step: Step) -> None:
    raise self._no_step(step)

  def delete_all_steps(self) -> list[Step]:
    return []

  def wait_until_finished(self) -> None:
    pass

  def close(self) -> None:
    pass

  def restore(
    self,
    state: Any = None,
    *,
    step: StepSpec = -1,
    noop_if_missing: bool = False,
    donate: bool = True,
    partial: bool = False,
  ) -> Any:
    del step, noop_if_missing, donate, partial
    return state
