"""`PartialLoader`: copy subtrees of another run's checkpoint (or a ``.safetensors`` file) into a new state.

Kauldron's `PartialKauldronLoader`, working on public Orbax: warm-start a
model from a pretrained run, an encoder into a decoder, a backbone into a
bigger model, or Hugging Face weights into a Flax model. Only the mapped
leaves are read from disk.

Keys are dotted pytree paths (``params.encoder.layer_0.w``; tuple and list
entries by index) and may hold globs: ``*`` matches one path component,
``**`` any number of them (at least one). A key matches a leaf when it
matches the leaf's path or a prefix of it, so a key names a whole subtree.
Globs in a target key are captured and substituted, in order, into the
globs of its source key:

>>> loader = PartialLoader(workdir="/runs/pretrained", new_to_old={"params.decoder_*": "params.encoder_*"})

copies ``params.encoder_0.w`` into ``params.decoder_0.w``, and so on.

A key with dots (``{"layer.0.w": x}``) is matched by ``layer.0.w``. Where two
leaves of a tree share a dotted path (``{"a.b": x, "a": {"b": y}}``, saved
with escaped keys), ``a.b`` names the nested one and ``a\\.b`` the key with
the dot.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from kckpt import _layout
from kckpt import _orbax
from kckpt import _run
from kckpt import _safetensors
from kckpt import multihost
from kckpt import policies
from kckpt import trees
from kckpt._types import PathLike, PyTree, StepSpec
from kckpt.errors import CheckpointNotFoundError, CheckpointReadError, TransplantError, describe_read_error

# -- Names --------------------------------------------------------------------------
#
# A leaf's name is its keys joined by "." with each key's backslash and "."
# escaped (a\.b is the key "a.b"; a.b the key "b" under "a"): unique in any
# tree. Its dotted path is the same keys joined as they are (a.b for both),
# which is what users write and what Orbax names leaves by. The keys given to
# `PartialLoader` are matched against names: a "." in them also matches a dot
# inside a key, except at leaves whose dotted path another leaf shares, where
# "." is a separator and a dot inside a key is written "\.". So the common
# case needs no escapes, and where two leaves share a dotted path, a.b names
# the nested one.


SAFETENSORS_SUFFIX = ".safetensors"


class _Glob(enum.Enum):
  ONE = "*"  # one key (or, at a leaf whose dotted path is its own, one dot-free part of it)
  ANY = "**"  # one or more keys


_Piece = str | _Glob  # a literal (in escaped form) or a glob


def _escape_key(key: str) -> str:
  return key.replace("\\", "\\\\").replace(".", "\\.")


def _unescape(name: str) -> str:
  """The dotted path of an escaped name: ``a\\.b.c`` -> ``a.b.c``."""
  return re.sub(r"\\(.)", r"\1", name) if "\\" in name else name


def _leaf_name(keypath: tuple[Any, ...]) -> str:
  return ".".join(_escape_key(trees.key_str(k)) for k in keypath) or "<root>"


@functools.lru_cache(maxsize=512)
def _parse(pattern: str) -> tuple[tuple[_Piece, ...], ...]:
  """A key's components (split at unescaped dots), each a tuple of literals and globs."""
  components: list[tuple[_Piece, ...]] = []
  pieces: list[_Piece] = []
  text = ""
  chars = iter(pattern)
  for c in chars:
    if c == "\\":
      nxt = next(chars, "\\")
      text += "\\" + nxt if nxt in ".\\" else nxt
    elif c in ".*":
      pieces.append(text)
      text = ""
      if c == "*":
        pieces.append(_Glob.ONE)
      else:
        components.append(tuple(pieces))
        pieces = []
    else:
      text += c
  pieces.append(text)
  components.append(tuple(pieces))
  return tuple((_Glob.ANY,) if c == ("", _Glob.ONE, "", _Glob.ONE, "") else c for c in components)


def _glob_count(pattern: str) -> int:
  return sum(isinstance(p, _Glob) for component in _parse(pattern) for p in component)


_ONE_PART = r"((?:[^.\\]|\\\\)+)"  # no dot at all, escaped or not
_ONE_KEY = r"((?:[^.\\]|\\.)+)"  # one key: escaped dots allowed
_ANY_KEYS = r"((?:[^\\]|\\.)+?)"


@functools.lru_cache(maxsize=512)
def _regex(pattern: str, *, strict: bool, prefix: bool) -> re.Pattern[str]:
  """A key -> a regex over escaped leaf names capturing each glob (and, with `prefix`, the rest of the name)."""
  sep = r"\." if strict else r"(?:\.|\\\.)"
  parts = []
  for component in _parse(pattern):
    text = ""
    for piece in component:
      if piece is _Glob.ANY:
        text += _ANY_KEYS
      elif piece is _Glob.ONE:
        text += _ONE_KEY if strict else _ONE_PART
      else:
        text += re.escape(piece)
    parts.append(text)
  body = sep.join(parts)
  if not prefix:
    return re.compile(rf"^{body}$")
  rest_sep = r"(\.)" if strict else r"(\.|\\\.)"
  return re.compile(rf"^{body}(?:{rest_sep}((?:[^\\]|\\.)+))?$")


def _substitute(pattern: str, captures: Sequence[str]) -> str:
  captures = list(captures)
  out = []
  for component in _parse(pattern):
    out.append("".join(captures.pop(0) if isinstance(piece, _Glob) else piece for piece in component))
  return ".".join(out)


class _Names:
  """The leaves of one tree by escaped name, with the dotted paths several of them share.

  Attributes:
    keys: escaped name -> the key the leaf is read or replaced by.
  """

  def __init__(self, keys: Mapping[str, str]):
    self.keys = dict(keys)
    self._by_dotted: dict[str, list[str]] = {}
    for name in self.keys:
      self._by_dotted.setdefault(_unescape(name), []).append(name)

  def shared(self, name: str) -> bool:
    """Whether another leaf has the dotted path of `name`."""
    return len(self._by_dotted.get(_unescape(name), ())) > 1

  def sharing(self, name: str) -> list[str]:
    """The leaves with the dotted path of `name` (itself included)."""
    return list(self._by_dotted.get(_unescape(name), [name]))

  def display(self, name: str) -> str:
    """How messages and `PartialLoader.mapping` write a leaf: its dotted path, escaped where shared."""
    return name if self.shared(name) else _unescape(name)

  def matches(self, name: str, patterns: Sequence[str]) -> bool:
    return any(_regex(p, strict=self.shared(name), prefix=True).match(name) for p in patterns)

  def resolve(self, wanted: str) -> tuple[str | None, list[str]]:
    """The leaf named `wanted` (a name, escaped where it needs to be), or None and the leaves it could mean."""
    if wanted in self.keys:
      return wanted, []
    candidates = self._by_dotted.get(_unescape(wanted), [])
    if len(candidates) == 1:
      return candidates[0], []
    return None, candidates

  def near(self, wanted: str) -> list[str]:
    first = _unescape(wanted).split(".")[0]
    return sorted(self.display(n) for n in self.keys if _unescape(n).startswith(first))[:5]


# -- Sources ----------------------------------------------------------------------------


class _CheckpointSource:
  """One pytree item of a saved step."""

  def __init__(self, item_dir: epath.Path, *, escaped: bool, step: int | None = None):
    self.item_dir = item_dir
    self.step = step
    self.kind = "the checkpoint"
    self.what = f"the checkpoint {item_dir}" if step is None else f"step {step}, item {item_dir.name!r} at {item_dir}"
    self.specs = _orbax.saved_leaf_specs(item_dir)  # saved name -> spec
    if escaped:  # saved names are escaped names
      self.names = _Names({name: name for name in self.specs})
    else:  # saved names are dotted paths, unique in the item
      self.names = _Names({name.replace("\\", "\\\\"): name for name in self.specs})

  def read(self, mapping: Mapping[str, str], targets: Mapping[str, Any]) -> dict[str, Any]:
    """Target name -> the value read for it, for target name -> saved name `mapping`."""
    # One read per round; a source copied to several targets is read once per target.
    rounds: list[dict[str, str]] = []
    for target, source in mapping.items():
      for round_ in rounds:
        if source not in round_.values():
          round_[target] = source
          break
      else:
        rounds.append({target: source})
    values = {}
    for round_ in rounds:
      wanted = {source: _orbax.abstract_target(targets[target]) for target, source in round_.items()}
      try:
        read = _orbax.read_leaves(self.item_dir, wanted)
      except Exception as e:  # pylint: disable=broad-exception-caught  # narrowed by is_read_error
        if not _orbax.is_read_error(e):
          raise
        raise CheckpointReadError(
          f"PartialLoader: cannot read {self.what}: {describe_read_error(e)}", step=self.step, item=self.item_dir.name
        ) from e
      values.update({target: read[source] for target, source in round_.items()})
    return values


class _SafetensorsSource:
  """A ``.safetensors`` file: arrays named by dotted paths (``model.layers.0.weight``)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.kind = "the file"
    self.what = f"the file {path}"
    try:
      with path.open("rb") as f:
        tensors = _safetensors.FileReader(f, where=str(path)).tensors
    except ValueError as e:
      raise TransplantError(f"PartialLoader: {e}") from None
    self.specs = {name: trees.LeafSpec(info.shape, info.dtype) for name, info in tensors.items()}
    self.names = _Names({name.replace("\\", "\\\\"): name for name in self.specs})  # names are dotted paths

  def read(self, mapping: Mapping[str, str], targets: Mapping[str, Any]) -> dict[str, Any]:
    """Target name -> the array read for it (cast to the target's dtype, on its devices)."""
    values = {}
    with self.path.open("rb") as f:
      reader = _safetensors.FileReader(f, where=str(self.path))
      for target, name in mapping.items():
        values[target] = _like(targets[target], reader.read(name), what=f"{name} of {self.what}")
    return values


def _like(leaf: Any, value: np.ndarray, *, what: str) -> Any:
  """`value` as the target `leaf` holds it: a `jax.Array` with its dtype and sharding, a NumPy array, a scalar."""
  abstract = _orbax.abstract_target(leaf)
  if isinstance(abstract, jax.ShapeDtypeStruct):
    if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
      raise TransplantError(f"{what}: typed PRNG keys are not loaded from safetensors files")
    cast = value.astype(abstract.dtype)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda index: cast[index])
  if isinstance(leaf, (np.ndarray, np.generic)):
    cast = value.astype(leaf.dtype)
    return cast if isinstance(leaf, np.ndarray) else type(leaf)(cast)
  return type(leaf)(value.item()) if isinstance(leaf, (bool, int, float, complex)) else value


_Source = _CheckpointSource | _SafetensorsSource


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialLoader:
  """Copies subtrees of another run's checkpoint into `state` at new paths.

  Attributes:
    workdir: the run to load from (its ``checkpoints/ckpt_<step>`` folders),
      or a ``.safetensors`` file (its arrays named by dotted paths; then
      `step` and `item` stay as they are).
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

    Reads the checkpoint's metadata only. Paths are dotted; where two leaves
    of a tree share a dotted path (``{"a.b": x, "a": {"b": y}}``), a dot
    inside a key is written ``\\.`` (``a\\.b`` is x, ``a.b`` is y).

    Raises:
      TransplantError: naming a key that matches no target leaf, a source
        leaf that does not exist, or shapes (or dtypes that cannot be cast)
        that differ.
    """
    source = self._open_source()
    targets = _Names({_leaf_name(kp): _leaf_name(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]})
    return {targets.display(t): source.names.display(s) for t, s in self._mapping(state, source, targets).items()}

  def _mapping(self, state: PyTree, source: _Source, targets: _Names) -> dict[str, str]:
    """Target name -> source name (escaped names) for every leaf to copy."""
    target_leaves = {_leaf_name(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    result: dict[str, str] = {}
    for new, old in self.new_to_old.items():
      matched = False
      for name, leaf in target_leaves.items():
        match = _regex(new, strict=targets.shared(name), prefix=True).match(name)
        if not match:
          continue
        matched = True
        if targets.matches(name, self.ignore_new):
          continue
        *captures, sep, rest = match.groups()
        wanted = _substitute(old, captures) + (sep + rest if rest else "")
        found, candidates = source.names.resolve(wanted)
        if found is None and any(_regex(p, strict=False, prefix=True).match(wanted) for p in self.ignore_old):
          continue
        if found is None and candidates:
          raise TransplantError(
            f"key {new!r}: target leaf {targets.display(name)} maps to {wanted}, which could be any of"
            f" {' and '.join(sorted(candidates))} in {source.what} (their dotted paths are the same: write a dot"
            " inside a key as \\.)"
          )
        if found is None:
          raise TransplantError(
            f"key {new!r}: target leaf {targets.display(name)} maps to {wanted}, which is not in"
            f" {source.what} (some of its leaves: {source.names.near(wanted)})"
          )
        if source.names.matches(found, self.ignore_old):
          continue
        if found != wanted and targets.shared(name):
          # Found by its dotted path only, while two target leaves have that path: the
          # source cannot tell which of them its leaf is (it would fill both).
          raise TransplantError(
            f"key {new!r}: target leaves {' and '.join(sorted(targets.display(n) for n in targets.sharing(name)))} share"
            f" the dotted path {_unescape(name)}, and {source.what} has one leaf there ({source.names.display(found)}),"
            " saved without telling them apart: map each of them explicitly, or ignore one (ignore_new)"
          )
        saved, target = source.specs[source.names.keys[found]], trees.leaf_spec(leaf)
        if saved.shape != target.shape or trees.compare_trees({found: saved}, {found: target}):
          raise TransplantError(
            f"key {new!r}: {source.names.display(found)} is {saved} in {source.kind} but {targets.display(name)} is {target}"
          )
        if name in result and result[name] != found:
          raise TransplantError(
            f"key {new!r}: {targets.display(name)} is already mapped from {source.names.display(result[name])}"
          )
        result[name] = found
      if not matched:
        some = sorted(targets.display(n) for n in target_leaves)[:5]
        raise TransplantError(f"key {new!r} matches no leaf of the state (its paths look like {some})")
    return result

  def transform(self, state: PyTree) -> PyTree:
    """`state` with the mapped leaves read from the checkpoint (cast to the state's dtypes).

    In a multi-process run every process must call it: a step name (``-1``,
    ``"best"``, a tag) resolves to the primary process's step on all of them.

    Raises:
      TransplantError: as `mapping` does.
      CheckpointNotFoundError: no such step, item or file.
      CheckpointReadError: a file of the step is missing, truncated or
        corrupted, or a leaf's bytes are not those saved (its checksum);
        the message names the step, the item and the leaves.
    """
    source = self._open_source()
    targets = _Names({_leaf_name(kp): _leaf_name(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]})
    mapping = self._mapping(state, source, targets)
    leaves = {_leaf_name(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    values = source.read({t: source.names.keys[s] for t, s in mapping.items()}, {t: leaves[t] for t in mapping})
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: values.get(_leaf_name(kp), leaf), state)

  def _open_source(self) -> _Source:
    given = epath.Path(self.workdir)
    if given.suffix == SAFETENSORS_SUFFIX or given.is_file():
      if self.step != -1 or self.item != _layout.DEFAULT_ITEM:
        raise TransplantError(f"PartialLoader: {given} is a safetensors file: it has no steps or items (step={self.step!r})")
      if not given.exists():
        raise CheckpointNotFoundError(f"PartialLoader: no such file: {given}")
      return _SafetensorsSource(given)
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
    # Saved with escaped keys ({"a.b": x, "a": {"b": y}}): its saved names are escaped names.
    escaped = self.item in _orbax.escaped_items(_orbax.read_step_metadata(path.parent))
    return _CheckpointSource(path, escaped=escaped, step=step)
