"""Pytree paths and the comparison of a restore target with a saved tree.

Paths are dotted strings built from JAX key paths, the form Orbax uses in its
metadata: ``params.dense.w``, ``opt_state.0.mu.w`` (tuple and list entries
by index).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from kckpt._types import PyTree


def key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: tuple[Any, ...]) -> str:
  return ".".join(key_str(k) for k in keypath) or "<root>"


def flatten_with_paths(tree: PyTree) -> dict[str, Any]:
  """``{"params.dense.w": leaf, ...}`` for every leaf of `tree`."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(path): leaf for path, leaf in leaves}


def replace_leaves(tree: PyTree, new_leaves: Mapping[str, Any]) -> PyTree:
  """`tree` with the leaves at the paths of `new_leaves` replaced."""
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: new_leaves.get(path_str(kp), leaf), tree)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """Shape and dtype of one leaf (dtype None: a Python scalar or string)."""

  shape: tuple[int, ...]
  dtype: np.dtype | None

  def __str__(self) -> str:
    return f"{self.shape} {self.dtype if self.dtype is not None else 'scalar'}"


def _is_key_dtype(dtype: Any) -> bool:
  try:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  except TypeError:
    return False


def leaf_spec(leaf: Any) -> LeafSpec:
  """The spec of a target leaf, as it is stored on disk.

  Typed PRNG keys are stored as their key data (``uint32`` with a trailing
  dimension), so their spec is that of the key data.
  """
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and hasattr(leaf, "shape"):
    if _is_key_dtype(dtype):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
      return LeafSpec(tuple(data.shape), np.dtype(data.dtype))
    return LeafSpec(tuple(leaf.shape), np.dtype(dtype))
  return LeafSpec((), None)


def _dtype_family(dtype: np.dtype) -> str:
  for family, generic in (
    ("bool", np.bool_),
    ("integer", np.integer),
    ("floating", np.floating),
    ("complex", np.complexfloating),
  ):
    if jax.numpy.issubdtype(dtype, generic):
      return family
  return str(dtype)


def _castable(saved: np.dtype | None, target: np.dtype | None) -> bool:
  """Floats cast into floats (float32 saved, bfloat16 wanted), integers into integers."""
  if saved is None or target is None:
    return True
  return _dtype_family(saved) == _dtype_family(target)


def tree_nbytes(tree: PyTree) -> int:
  """Bytes of all array leaves of `tree` (works on `jax.ShapeDtypeStruct` trees too).

  >>> tree_nbytes({"w": jax.ShapeDtypeStruct((2, 3), np.float32)})
  24
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    spec = leaf_spec(leaf)  # typed PRNG keys count as their key data
    if spec.dtype is not None:
      total += int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
    elif isinstance(leaf, numbers.Number):  # a Python scalar, stored as a 0-d array
      total += np.asarray(leaf).nbytes
  return total


def compare_trees(
  saved: Mapping[str, LeafSpec],
  target: Mapping[str, LeafSpec],
  *,
  prefix: str = "",
) -> list[str]:
  """One line per leaf at fault: missing, unexpected, mis-shaped or mis-typed.

  `saved` and `target` map paths to specs. Dtypes that can be cast into each
  other (float32 saved, bfloat16 wanted) are not a fault.
  """
  problems = []
  for path in sorted(saved.keys() - target.keys()):
    problems.append(f"{prefix}{path}: in the checkpoint ({saved[path]}) but not in the target")
  for path in sorted(target.keys() - saved.keys()):
    problems.append(f"{prefix}{path}: in the target ({target[path]}) but not in the checkpoint")
  for path in sorted(saved.keys() & target.keys()):
    s, t = saved[path], target[path]
    if s.dtype is None or t.dtype is None:
      continue  # Python scalars restore into whatever the target holds.
    if s.shape != t.shape or not _castable(s.dtype, t.dtype):
      problems.append(f"{prefix}{path}: saved {s}, target {t}")
  return problems


def is_saveable_leaf(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic, str, numbers.Number)) or leaf is None


def save_check(tree: PyTree) -> tuple[list[str], list[str]]:
  """What stops `tree` from being saved as it is, from one pass over its leaves.

  Returns one line per leaf that Orbax cannot write (its path and why), and
  the dotted names that several leaves would be saved under (see
  `path_collisions`).
  """
  problems, seen, collisions = [], set(), set()
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = path_str(keypath)
    if path in seen:
      collisions.add(path)
    seen.add(path)
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
      problems.append(f"{path}: the array was deleted (donated to a restore, or freed)")
    elif not is_saveable_leaf(leaf):
      problems.append(f"{path}: {type(leaf).__module__}.{type(leaf).__qualname__} is not an array or scalar")
  return problems, sorted(collisions)


def unsaveable_leaves(tree: PyTree) -> list[str]:
  """One line per leaf that Orbax cannot write: its path and why."""
  return save_check(tree)[0]


# -- Keys with dots -------------------------------------------------------------------
#
# Orbax names each leaf on disk by its keys joined with ".", so ``{"a.b": x}``
# and ``{"a": {"b": y}}`` in one tree are both written as ``a.b``: one overwrites
# the other. When (and only when) a tree has such a collision, kckpt saves it
# with its dict keys escaped (``\\`` -> ``\\\\``, ``.`` -> ``\\.``), which makes every
# joined name unique, records that in the step, and undoes it on restore. Trees
# without a collision (the common flat ``{"layer.0.weight": ...}`` dicts of
# converted PyTorch weights) are written as they are, readable by plain Orbax.


def path_collisions(tree: PyTree) -> list[str]:
  """The dotted names that more than one leaf of `tree` would be saved under (empty: none).

  >>> path_collisions({"a.b": 1, "a": {"b": 2}, "c": 3})
  ['a.b']
  """
  seen: dict[str, int] = {}
  for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_str(keypath)
    seen[name] = seen.get(name, 0) + 1
  return sorted(name for name, count in seen.items() if count > 1)


def _escape_key(key: Any) -> Any:
  return key.replace("\\", "\\\\").replace(".", "\\.") if isinstance(key, str) else key


def _unescape_key(key: Any) -> Any:
  if not isinstance(key, str) or "\\" not in key:
    return key
  out, chars = [], iter(key)
  for c in chars:
    out.append(next(chars, "") if c == "\\" else c)
  return "".join(out)


def _is_rebuildable_mapping(node: Any) -> bool:
  # dict, OrderedDict, flax's FrozenDict...: mappings rebuilt from a dict of their items.
  return isinstance(node, Mapping) and (isinstance(node, dict) or hasattr(type(node), "unfreeze"))


def _map_dict_keys(tree: PyTree, rename: Any) -> PyTree:
  def rebuild(node: Any) -> Any:
    if _is_rebuildable_mapping(node):
      return type(node)({rename(k): _map_dict_keys(v, rename) for k, v in node.items()})
    return node

  return jax.tree.map(rebuild, tree, is_leaf=_is_rebuildable_mapping)


def escape_dotted_keys(tree: PyTree) -> PyTree:
  """`tree` with every dict key's ``\\`` and ``.`` escaped, so that joined names are unique.

  >>> escape_dotted_keys({"a.b": 1, "a": {"b": 2}})
  {'a\\\\.b': 1, 'a': {'b': 2}}
  >>> unescape_dotted_keys(escape_dotted_keys({"a.b": 1, "c\\\\": {"d": 2}}))
  {'a.b': 1, 'c\\\\': {'d': 2}}
  """
  return _map_dict_keys(tree, _escape_key)


def unescape_dotted_keys(tree: PyTree) -> PyTree:
  """The inverse of `escape_dotted_keys`."""
  return _map_dict_keys(tree, _unescape_key)
