"""`PartialLoader`: copy subtrees of another run's checkpoint into a new state.

Kauldron's `PartialKauldronLoader`, working on public Orbax: warm-start a
model from a pretrained run, an encoder into a decoder, a backbone into a
bigger model. Only the mapped leaves are read from disk.

Keys are dotted pytree paths (``params.encoder.layer_0.w``; tuple and list
entries by index) and may hold globs: ``*`` matches one path component,
``**`` any number of them (at least one). A key matches a leaf when it
matches the leaf's path or a prefix of it, so a key names a whole subtree.
Globs in a target key are captured and substituted, in order, into the
globs of its source key:

>>> loader = PartialLoader(workdir="/runs/pretrained", new_to_old={"params.decoder_*": "params.encoder_*"})

copies ``params.encoder_0.w`` into ``params.decoder_0.w``, and so on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from etils import epath

from kckpt import _layout
from kckpt import _orbax
from kckpt import _run
from kckpt import multihost
from kckpt import policies
from kckpt import trees
from kckpt._types import PathLike, PyTree, StepSpec
from kckpt.errors import CheckpointNotFoundError, TransplantError


def _glob_regex(pattern: str, *, prefix: bool) -> re.Pattern[str]:
  """``params.*.w`` -> a regex over dotted paths capturing each glob."""
  parts = []
  for component in pattern.split("."):
    if component == "**":
      parts.append(r"(.+?)")
    else:
      parts.append(r"([^.]+)".join(re.escape(piece) for piece in component.split("*")))
  body = r"\.".join(parts)
  return re.compile(rf"^{body}(?:\.(.+))?$" if prefix else rf"^{body}$")


def _glob_count(pattern: str) -> int:
  return sum(1 if c == "**" else c.count("*") for c in pattern.split("."))


def _substitute(pattern: str, captures: Sequence[str]) -> str:
  captures = list(captures)
  out = []
  for component in pattern.split("."):
    if component == "**":
      out.append(captures.pop(0))
    else:
      pieces = component.split("*")
      text = pieces[0]
      for piece in pieces[1:]:
        text += captures.pop(0) + piece
      out.append(text)
  return ".".join(out)


def _matches_any(path: str, patterns: Sequence[str]) -> bool:
  return any(_glob_regex(p, prefix=True).match(path) for p in patterns)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialLoader:
  """Copies subtrees of another run's checkpoint into `state` at new paths.

  Attributes:
    workdir: the run to load from (its ``checkpoints/ckpt_<step>`` folders).
    new_to_old: target path (in the state given to `transform`) -> source
      path (in the checkpoint). Both may hold ``*`` / ``**`` globs.
    step: the source step: a number, -1 / ``"latest"``, ``"best"`` (by the
      metric the source run's writer recorded) or a tag.
    item: the source item (``"default"`` for a single saved state).
    ignore_new: target paths (globs) that stay as they are even when a key
      covers them.
    ignore_old: source paths (globs) never copied; a target leaf mapped onto
      one stays as it is.

  Example: warm-start a new run, then resume it normally::

    loader = kckpt.PartialLoader(workdir=pretrained, new_to_old={"params.encoder": "params.encoder"})
    state = init_state()
    if ckpt.latest_step is None:
      state = loader.transform(state)       # first start: pretrained encoder
    else:
      state = ckpt.restore(state)           # later starts: this run's own checkpoints
  """

  workdir: PathLike
  new_to_old: Mapping[str, str]
  step: StepSpec = -1
  item: str = _layout.DEFAULT_ITEM
  ignore_new: Sequence[str] = ()
  ignore_old: Sequence[str] = ()

  def __post_init__(self):
    object.__setattr__(self, "new_to_old", dict(self.new_to_old))
    object.__setattr__(self, "ignore_new", tuple(self.ignore_new))
    object.__setattr__(self, "ignore_old", tuple(self.ignore_old))
    for new, old in self.new_to_old.items():
      if _glob_count(new) != _glob_count(old):
        raise TransplantError(f"new_to_old[{new!r}] = {old!r}: both sides need the same number of globs")

  def __hash__(self) -> int:
    return hash(
      (str(self.workdir), tuple(sorted(self.new_to_old.items())), self.step, self.item, self.ignore_new, self.ignore_old)
    )

  def mapping(self, state: PyTree) -> dict[str, str]:
    """Target leaf path -> source leaf path, for every leaf that will be copied.

    Reads the checkpoint's metadata only.

    Raises:
      TransplantError: naming a key that matches no target leaf, a source
        leaf that does not exist, or shapes that differ.
    """
    return self._mapping(state, self._source_dir())

  def _mapping(self, state: PyTree, source_dir) -> dict[str, str]:
    collisions = trees.path_collisions(state)
    if collisions:
      raise TransplantError(
        f"the state has leaves whose dotted paths are the same ({collisions[:5]}: a key with a dot next to"
        " nested keys); PartialLoader keys are dotted paths and cannot tell them apart"
      )
    source_specs = _orbax.saved_leaf_specs(source_dir)
    target_leaves = trees.flatten_with_paths(state)
    result: dict[str, str] = {}
    for new, old in self.new_to_old.items():
      regex = _glob_regex(new, prefix=True)
      matched = False
      for path, leaf in target_leaves.items():
        match = regex.match(path)
        if not match:
          continue
        matched = True
        if _matches_any(path, self.ignore_new):
          continue
        *captures, suffix = match.groups()
        source = _substitute(old, captures) + (f".{suffix}" if suffix else "")
        if _matches_any(source, self.ignore_old):
          continue
        if source not in source_specs:
          nearby = sorted(p for p in source_specs if p.startswith(source.split(".")[0]))[:5]
          raise TransplantError(
            f"key {new!r}: target leaf {path} maps to {source}, which is not in the checkpoint"
            f" {source_dir} (some of its leaves: {nearby})"
          )
        saved, wanted = source_specs[source], trees.leaf_spec(leaf)
        if saved.shape != wanted.shape:
          raise TransplantError(f"key {new!r}: {source} is {saved} in the checkpoint but {path} is {wanted}")
        if path in result and result[path] != source:
          raise TransplantError(f"key {new!r}: {path} is already mapped from {result[path]}")
        result[path] = source
      if not matched:
        raise TransplantError(f"key {new!r} matches no leaf of the state (its paths look like {sorted(target_leaves)[:5]})")
    return result

  def transform(self, state: PyTree) -> PyTree:
    """`state` with the mapped leaves read from the checkpoint (cast to the state's dtypes).

    In a multi-process run every process must call it: a step name (``-1``,
    ``"best"``, a tag) resolves to the primary process's step on all of them.
    """
    source_dir = self._source_dir()
    mapping = self._mapping(state, source_dir)
    leaves = trees.flatten_with_paths(state)
    # One read per round; a source copied to several targets is read once per target.
    rounds: list[dict[str, str]] = []
    for target, source in mapping.items():
      for round_ in rounds:
        if source not in round_.values():
          round_[target] = source
          break
      else:
        rounds.append({target: source})
    new_leaves = {}
    for round_ in rounds:
      wanted = {source: _orbax.abstract_target(leaves[target]) for target, source in round_.items()}
      read = _orbax.read_leaves(source_dir, wanted)
      new_leaves.update({target: read[source] for target, source in round_.items()})
    return trees.replace_leaves(state, new_leaves)

  def _source_dir(self) -> epath.Path:
    checkpoints = _layout.checkpoints_dir(self.workdir)
    rules = _layout.read_retention_rules(checkpoints)
    retention = None
    if rules is not None and not rules.get("best_fn"):
      retention = policies.policy_from_rules(rules)
    index = _run.RunIndex(checkpoints, retention=retention)
    try:
      step = _run.agreed_resolution(index, self.step, timeout_secs=multihost.DEFAULT_BARRIER_TIMEOUT_SECS)
      if step is None:
        raise CheckpointNotFoundError(f"no checkpoint in {checkpoints}")
      index.require_exists(step)
    except CheckpointNotFoundError as e:
      raise CheckpointNotFoundError(f"PartialLoader: {e}", available_steps=e.available_steps) from None
    path = _layout.step_dir(checkpoints, step) / self.item
    if not path.exists():
      raise CheckpointNotFoundError(f"PartialLoader: no item {self.item!r} at step {step} in {checkpoints}")
    if self.item in _orbax.escaped_items(_orbax.read_step_metadata(path.parent)):
      raise TransplantError(
        f"step {step} of {checkpoints} saved item {self.item!r} with escaped keys (a key with a dot next to"
        " nested keys): PartialLoader's dotted keys cannot tell its leaves apart; restore it with"
        " Checkpointer.restore and copy the leaves you need"
      )
    return path
