"""Restoring one finished step into a target: the only place that donates the target's arrays.

The order matters: the step's items and every target leaf are checked against
the saved metadata first, and only then are the target's arrays freed
(donated) and the arrays read, so a mismatch never costs the caller its state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
from etils import epath

from kckpt import _gc
from kckpt import _layout
from kckpt import _orbax
from kckpt import _progress
from kckpt import _run
from kckpt import items as items_lib
from kckpt import multihost
from kckpt import storage as storage_lib
from kckpt import telemetry
from kckpt import trees
from kckpt._types import Step, StepSpec
from kckpt.errors import CheckpointNotFoundError, CheckpointReadError, TreeMismatchError

if TYPE_CHECKING:
  from kckpt.checkpointer import Checkpointer

_FREED = "The target's arrays had already been freed (donate=True)"


@dataclasses.dataclass(frozen=True)
class _ItemRead:
  """How one item of the step is read: into `target`, or as saved when `target` is None."""

  name: str
  item: items_lib.CheckpointItem | None  # None: no target item (restore(None))
  format: str
  target: Any = None
  partial_paths: frozenset[str] | None = None  # partial restore: the leaves both trees have


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_step` read: the rebuilt state, and the bytes of array data in it."""

  value: Any
  nbytes: int


def restore_run(ckpt: Checkpointer, state: Any, *, step: StepSpec, noop_if_missing: bool, donate: bool, partial: bool) -> Any:
  """`Checkpointer.restore`, once pending saves are durable: the step agreed by every process, from either tier."""
  started = time.perf_counter()
  index, rt = ckpt._index, ckpt._rt  # pylint: disable=protected-access
  resolved = _run.agreed_resolution(index, step, timeout_secs=ckpt.barrier_timeout_secs)
  tier = ckpt._local_tier() if step in (-1, "latest") and state is not None else None  # pylint: disable=protected-access
  local = tier.restore_newest(state, persistent_latest=resolved) if tier is not None else None
  if tier is not None and local is not None:
    if ckpt.create:
      tier.hide_newer_than(local[0])  # newer local steps that could not be restored: an abandoned continuation
    if donate:
      _orbax.release(state)
    rt.restore_stats = telemetry.restore_stats(local[0], trees.tree_nbytes(local[1]), started, tier.folder, tier="local")
    return local[1]
  if resolved is None:
    if noop_if_missing and step in (-1, "latest"):
      return state
    raise CheckpointNotFoundError(
      f"No {index.missing_what(step)} found in {ckpt.directory}. Use `noop_if_missing=True` to keep the initial state."
    )
  step = index.require_exists(resolved)
  if multihost.process_count() > 1:  # Orbax's restore ends with a barrier that has no timeout
    multihost.barrier("restore", timeout_secs=ckpt.barrier_timeout_secs, what=f"restore(step={step})")
  restored = restore_step(ckpt.directory, step, state, donate=donate, partial=partial, storage=ckpt.storage)
  if state is not None and ckpt.create and (tier := ckpt._local_tier()) is not None:  # pylint: disable=protected-access
    tier.hide_newer_than(step)  # a writer resumes from `step`: newer local steps belong to an abandoned continuation
  rt.restore_stats = telemetry.restore_stats(step, restored.nbytes, started, ckpt.directory)
  return restored.value


def restore_step(
  checkpoints: epath.Path,
  step: Step,
  state: Any,
  *,
  donate: bool,
  partial: bool,
  storage: storage_lib.StorageOptions | None = None,
) -> Restored:
  """Restores the finished `step` of `checkpoints` into the structure of `state` (None: as saved).

  Raises:
    CheckpointNotFoundError: the step disappeared (e.g. deleted by the trainer's retention mid-read).
    TreeMismatchError: naming every missing, unexpected and mis-shaped leaf.
    CheckpointReadError: a file of the step is missing, truncated or corrupted.
  """
  step_path = _layout.step_dir(checkpoints, step)
  try:
    with _gc.paused():  # kckpt's and Orbax's Python per leaf: see `_gc`
      return _restore(step_path, step, state, donate=donate, partial=partial, storage=storage)
  except (CheckpointReadError, FileNotFoundError) as e:
    if _deleted(step_path):  # e.g. the trainer's retention removed it mid-read
      freed = _FREED in str(e)
      raise CheckpointNotFoundError(
        f"Step {step} was deleted from {checkpoints} while it was being restored."
        + (f" {_FREED}: restore into a new target." if freed else "")
      ) from e
    raise


def _deleted(step_path: epath.Path) -> bool:
  """Whether the step is gone or going: its folder is missing, or (object stores) its commit marker is.

  On object stores a deletion removes the commit marker first, then the
  objects one by one, so a step whose marker is gone is being deleted even
  while some of its files remain.
  """
  if not step_path.exists():
    return True
  return _orbax.needs_commit_marker(step_path) and not _orbax.is_committed(step_path)


def _restore(
  step_path: epath.Path, step: Step, state: Any, *, donate: bool, partial: bool, storage: storage_lib.StorageOptions | None
) -> Restored:
  metadata = _orbax.read_step_metadata(step_path)
  saved_items = _orbax.item_formats(step_path, metadata)
  escaped = _orbax.escaped_items(metadata)  # saved with escaped dict keys: {"a.b": x, "a": {"b": y}}
  user_items = {n: f for n, f in saved_items.items() if n not in _layout.RESERVED_ITEMS}
  if not user_items:
    raise CheckpointReadError(
      f"Cannot read step {step} of {step_path.parent}: {step_path} holds no checkpoint item"
      " (no _CHECKPOINT_METADATA and no item folder)",
      step=step,
    )
  layout = _layout_for(state, user_items)
  reads = _plan(step_path, step, layout, user_items, partial=partial, donate=donate, escaped=escaped)
  restored: dict[str, Any] = {}
  as_saved = [r for r in reads if r.target is None]
  if as_saved:  # JSON items, and items with no target, in one Orbax call
    with reading(step, ", ".join(r.name for r in as_saved), step_path):
      restored.update(
        _orbax.read_items(step_path, [_orbax.ItemRead(name=r.name, format=r.format) for r in as_saved], storage=storage)
      )
  targeted = [r for r in reads if r.target is not None]
  checks = contextlib.ExitStack()  # the step's checksums, loaded once for every item read below
  if targeted:  # a step whose checksums cannot be read fails here, before anything is donated
    with reading(step, ", ".join(r.name for r in targeted), step_path):
      checks.enter_context(_orbax.checking(step_path))
  with checks:
    for r in targeted:  # a configuration that cannot read a leaf fails here, before anything is read or donated
      if r.format == "pytree" and r.partial_paths is None:
        try:
          _orbax.read_storage(storage, trees.flatten_with_paths(_orbax.abstract_target(r.target)))
        except ValueError as e:
          raise ValueError(f"Cannot restore step {step}, item {r.name!r}: {e}") from None
    progress = _progress.Transfer(
      f"restore step {step}",
      total_bytes=sum(trees.tree_nbytes(r.target) for r in targeted if r.format == "pytree"),
      total_leaves=sum(len(jax.tree.leaves(r.target)) for r in targeted if r.format == "pytree"),
    )
    try:
      for r in targeted:
        with reading(step, r.name, step_path / r.name, donated=donate and _has_device_arrays(r.target)):
          value = _read_into(step_path / r.name, r, donate, storage, on_batch=progress.advance)
        restored[r.name] = _orbax.match_scalar_types(r.target, value)
    finally:
      progress.close()
  for r in reads:
    if r.name in escaped and r.format == "pytree":
      restored[r.name] = trees.unescape_dotted_keys(restored[r.name])
  nbytes = sum(trees.tree_nbytes(restored[r.name]) for r in reads if r.format == "pytree")
  for r in reads:
    if r.item is not None:
      restored[r.name] = r.item.from_restored(restored[r.name])
  return Restored(value=layout.rebuild({r.name: restored[r.name] for r in reads}), nbytes=nbytes)


def _plan(
  step_path: epath.Path,
  step: Step,
  layout: items_lib.Layout,
  saved_items: Mapping[str, str],
  *,
  partial: bool,
  donate: bool,
  escaped: frozenset[str] = frozenset(),
) -> list[_ItemRead]:
  """What to read of each item, after checking every target against the saved metadata (no array read).

  With `donate`, also checks that every data file the read needs is there and
  whole, so that a damaged step is reported before the target is freed.
  """
  reads: list[_ItemRead] = []
  problems: list[str] = []
  for name, item in layout.items.items():
    if name not in saved_items:
      problems.append(f"{name}: no such item in step {step} (it has: {sorted(saved_items)})")
      continue
    fmt = saved_items[name] if item is None else item.format
    target = None if item is None or fmt == "json" else item.restore_target()
    if target is not None and name in escaped:
      target = trees.escape_dotted_keys(target)  # the same leaves (donation frees the caller's arrays)
    elif target is not None and trees.path_collisions(target):
      problems.extend(
        f"{'' if layout.kind == 'single' else name + '/'}{path}: several target leaves have this dotted path"
        " (a key with a dot next to nested keys), but the step was saved without them"
        for path in trees.path_collisions(target)
      )
      continue
    common = None
    if target is not None:
      if donate and _has_device_arrays(target):
        # Before anything is freed: every data file the read will need is there and whole.
        with reading(step, name, step_path / name):
          damaged = _orbax.damaged_files(step_path / name)
        if damaged:
          raise CheckpointReadError(
            f"Cannot read step {step}, item {name!r} at {step_path / name}: "
            + "; ".join(damaged)
            + " (found before the target was freed: nothing was read)",
            step=step,
            item=name,
          )
      with reading(step, name, step_path / name):
        saved = _orbax.saved_leaf_specs(step_path / name)
      wanted = {path: trees.leaf_spec(leaf) for path, leaf in trees.flatten_with_paths(target).items()}
      if partial:
        common = frozenset(saved.keys() & wanted.keys())
        saved = {p: saved[p] for p in common}
        wanted = {p: wanted[p] for p in common}
      problems.extend(trees.compare_trees(saved, wanted, prefix="" if layout.kind == "single" else f"{name}/"))
    reads.append(_ItemRead(name=name, item=item, format=fmt, target=target, partial_paths=common))
  if problems:
    raise TreeMismatchError(
      f"Cannot restore step {step} of {step_path.parent}: the target does not match the checkpoint"
      f" ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
      + "\n  ".join(problems)
      + "\nTo restore only some items, ask for them by name with kckpt.items.Composite(name=...);"
      " to keep target leaves the checkpoint lacks, pass partial=True.",
      problems=problems,
    )
  return reads


def _has_device_arrays(tree: Any) -> bool:
  return any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))


def _read_into(
  item_dir: epath.Path,
  read: _ItemRead,
  donate: bool,
  storage: storage_lib.StorageOptions | None,
  on_batch: Callable[[int, int], None] | None = None,
) -> Any:
  if read.partial_paths is None:
    return _orbax.read_tree_into(item_dir, read.target, donate=donate, storage=storage, on_batch=on_batch)
  # Partial: read the leaves both trees have, keep the target's others as they are.
  leaves = trees.flatten_with_paths(read.target)
  abstract = {p: _orbax.abstract_target(leaves[p]) for p in read.partial_paths}
  if donate:
    _orbax.release([leaves[p] for p in read.partial_paths])
  return trees.replace_leaves(read.target, _orbax.read_leaves(item_dir, abstract) if abstract else {})


def _layout_for(state: Any, saved_items: Mapping[str, str]) -> items_lib.Layout:
  """The items to restore: those of `state`, or with no state the ``default`` item (else every item)."""
  if state is not None:
    return items_lib.layout_of(state)
  if _layout.DEFAULT_ITEM in saved_items:
    return items_lib.Layout({_layout.DEFAULT_ITEM: None}, "single")
  return items_lib.Layout({n: None for n in saved_items}, "composite")


@contextlib.contextmanager
def reading(step: Step, item: str, path: epath.Path, *, donated: bool = False) -> Iterator[None]:
  """Turns an error of Orbax/TensorStore while reading into one that names the step and item.

  Only errors of the read itself: kckpt's own errors pass as they are, and so
  do programming errors (TypeError, AttributeError...) of kckpt or its items.
  """
  try:
    yield
  except (CheckpointReadError, TreeMismatchError):
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
    if not _orbax.is_read_error(e):
      raise
    lost = (
      f" {_FREED} after every check passed: restore into a new target, or pass donate=False where a step may be damaged."
      if donated
      else ""
    )
    raise CheckpointReadError(
      f"Cannot read step {step}, item {item!r} at {path}: {type(e).__name__}: {e}.{lost}", step=step, item=item
    ) from e


def saved_shapes(details: _run.StepDetails) -> Any:
  """The saved trees of a step with `jax.ShapeDtypeStruct` leaves (no array read).

  The ``default`` item's tree when the step has one, else a `Composite` of
  every pytree item's tree: what `restore` accepts as a target.
  """
  escaped = _orbax.escaped_items(_orbax.read_step_metadata(details.path))
  shapes = {
    n: _orbax.metadata_as_shape_dtype(details.path / n, unescape=n in escaped)
    for n in details.user_items
    if details.items[n] == "pytree"
  }
  return shapes[_layout.DEFAULT_ITEM] if _layout.DEFAULT_ITEM in shapes else items_lib.Composite(**shapes)
