"""What goes into a checkpoint step: pluggable items.

Any JAX pytree can be given to `Checkpointer.save` / `restore` as it is; it is
stored as the item ``default``. To store several things in one step, give a
`Composite` (or a `TopLevelCheckpointItem`); to store something that is not a
pytree of arrays, write a `CheckpointItem`.

Example:

>>> import numpy as np
>>> from kckpt import items
>>> state = items.Composite(params={"w": np.ones(3)}, config=items.Json({"lr": 0.1}))
>>> sorted(state.names)
['config', 'params']
>>> state.params["w"].shape
(3,)
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

from kckpt import _layout
from kckpt._types import PyTree

ItemFormat = Literal["pytree", "json"]


class CheckpointItem(abc.ABC):
  """The base class of pluggable checkpoint items.

  An item says how it is saved (`format` and `checkpoint_value`), how it is
  restored (`restore_target`) and what to do after restoring
  (`from_restored`):

  ```python
  value = item.checkpoint_value()            # written as `item.format`
  raw = read(format, target=item.restore_target())
  restored = item.from_restored(raw)         # what `restore` returns
  ```

  `format` is ``"pytree"`` (a tree of arrays and scalars, written by Orbax's
  PyTree handler; restored with the target's shapes, dtypes and shardings) or
  ``"json"`` (a JSON value).

  Example, a data iterator that saves its position:

  >>> class Cursor(CheckpointItem):
  ...   format = "json"
  ...   def __init__(self, position=0):
  ...     self.position = position
  ...   def checkpoint_value(self):
  ...     return {"position": self.position}
  ...   def from_restored(self, value):
  ...     return Cursor(value["position"])
  >>> Cursor(7).from_restored(Cursor(7).checkpoint_value()).position
  7
  """

  format: ClassVar[ItemFormat] = "pytree"

  @abc.abstractmethod
  def checkpoint_value(self) -> Any:
    """The value written to disk."""

  def restore_target(self) -> Any:
    """What to read into: shapes, dtypes, shardings (None: as saved, on the host)."""
    return self.checkpoint_value() if self.format == "pytree" else None

  @abc.abstractmethod
  def from_restored(self, value: Any) -> Any:
    """Builds the restored object from what was read."""


class StandardCheckpointItem(CheckpointItem):
  """Mixin for pytree dataclasses (e.g. a `flax.struct.dataclass` train state).

  The object itself is the saved pytree, and `restore` returns the same type.
  A bare ``StandardCheckpointItem()`` restores whatever was saved, as host
  arrays.

  >>> import flax, numpy as np
  >>> @flax.struct.dataclass
  ... class TrainState(StandardCheckpointItem):
  ...   params: dict
  >>> TrainState(params={"w": np.zeros(2)}).checkpoint_value().params["w"].shape
  (2,)
  """

  def checkpoint_value(self) -> Any:
    return self

  def restore_target(self) -> Any:
    return None if type(self) is StandardCheckpointItem else self

  def from_restored(self, value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class PyTreeItem(CheckpointItem):
  """A plain pytree (what `restore` and `save` wrap bare trees in).

  `value=None` as a restore target reads the tree as saved, as NumPy arrays.
  """

  value: PyTree = None

  def checkpoint_value(self) -> Any:
    return self.value

  def restore_target(self) -> Any:
    return self.value

  def from_restored(self, value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Json(CheckpointItem):
  """A JSON-serialisable value (run metadata, a config, timers).

  Restores to the same Python value (not to a `Json`).

  >>> Json({"epoch": 3}).checkpoint_value()
  {'epoch': 3}
  """

  value: Any = None
  format: ClassVar[ItemFormat] = "json"

  def checkpoint_value(self) -> Any:
    return self.value

  def from_restored(self, value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class DataIterator(CheckpointItem):
  """A data iterator's position: what its ``get_state()`` returns, one per process.

  Any iterator with ``get_state()`` and ``set_state(state)`` (grain's
  `DatasetIterator` and `DataLoader` iterators) whose state is a JSON value
  or bytes. Saving asks every process for its state (in a multi-process run
  each process's own, gathered through JAX's coordination service: every
  process must save, as it must anyway) and writes them in one JSON item;
  restoring gives process *i* the state process *i* saved, through
  ``set_state``, and returns the item, whose `iterator` goes on from there.
  A restart with another number of processes is an error (each position
  belongs to one process's shard of the data); restore the item as saved
  (``Composite(data=None)``) to place them yourself.

  >>> class Counter:
  ...   def __init__(self):
  ...     self.n = 0
  ...   def __next__(self):
  ...     self.n += 1
  ...     return self.n
  ...   def get_state(self):
  ...     return {"n": self.n}
  ...   def set_state(self, state):
  ...     self.n = state["n"]
  >>> it = Counter()
  >>> _ = next(it), next(it)
  >>> saved = DataIterator(it).checkpoint_value()
  >>> saved["states"]
  [{'json': {'n': 2}}]
  >>> next(DataIterator(Counter()).from_restored(saved).iterator)
  3

  Attributes:
    iterator: the iterator (on restore, a fresh one of the same data: its
      state is set from the checkpoint).
  """

  iterator: Any
  format: ClassVar[ItemFormat] = "json"

  def checkpoint_value(self) -> dict[str, Any]:
    from kckpt import multihost  # pylint: disable=import-outside-toplevel  (JAX, only when saving)

    mine = _encode_state(self.iterator.get_state())
    count = multihost.process_count()
    if count == 1:
      states = [mine]
    else:
      posted = multihost.exchange(
        "data_iterator", [mine], timeout_secs=multihost.DEFAULT_BARRIER_TIMEOUT_SECS, what="saving a DataIterator"
      )
      states = [posted[i][0] for i in range(count)]
    return {_DATA_ITERATOR_KEY: 1, "process_count": count, "states": states}

  def from_restored(self, value: Any) -> DataIterator:
    from kckpt import multihost  # pylint: disable=import-outside-toplevel

    if not isinstance(value, Mapping) or _DATA_ITERATOR_KEY not in value or not isinstance(value.get("states"), list):
      raise ValueError(f"DataIterator: the saved item is not a DataIterator's (it holds {_short_repr(value)})")
    saved, count = value["process_count"], multihost.process_count()
    if saved != count or len(value["states"]) != count:
      raise ValueError(
        f"DataIterator: the step was saved by {saved} process(es), this run has {count}: each process resumes"
        f" its own position, so restart with {saved}, or restore the item as saved (Composite(name=None), the"
        " states of all processes) and set the positions yourself"
      )
    self.iterator.set_state(_decode_state(value["states"][multihost.process_index()]))
    return self


_DATA_ITERATOR_KEY = "data_iterator"  # the version of the saved layout


def _encode_state(state: Any) -> dict[str, Any]:
  if isinstance(state, (bytes, bytearray)):  # grain's DataLoader iterators: JSON as bytes
    return {"bytes": base64.b64encode(bytes(state)).decode("ascii")}
  try:
    json.dumps(state, allow_nan=True)
  except (TypeError, ValueError) as e:
    raise TypeError(f"DataIterator: get_state() returned {type(state).__name__}, which is neither JSON nor bytes ({e})") from None
  return {"json": state}


def _decode_state(entry: Mapping[str, Any]) -> Any:
  return base64.b64decode(entry["bytes"]) if "bytes" in entry else entry["json"]


def check_json(value: Any, *, name: str) -> None:
  """Raises ValueError naming the item when `value` is not JSON-serialisable."""
  try:
    json.dumps(value, allow_nan=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"item {name!r}: value is not JSON-serialisable: {e}") from None


def as_item(value: Any) -> CheckpointItem:
  """`value` itself if it is an item, else a `PyTreeItem` around it."""
  return value if isinstance(value, CheckpointItem) else PyTreeItem(value)


class Composite(Mapping[str, Any]):
  """Several named items in one step, each in its own folder.

  Values are items or plain pytrees. Restoring a `Composite` reads only the
  names it holds (restore ``params`` without reading ``opt_state``), and
  returns a `Composite` of the restored values, reachable as attributes and
  by ``[name]``. As a restore target, a value of None reads that item as
  saved (NumPy arrays, or the JSON value).

  >>> c = Composite(step=3, meta=Json({"a": 1}))
  >>> c.step, c["meta"].value
  (3, {'a': 1})
  """

  def __init__(self, **named: Any):
    for name in named:
      validate_item_name(name)
    object.__setattr__(self, "_named", dict(named))

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._named)

  def __getitem__(self, name: str) -> Any:
    return self._named[name]

  def __getattr__(self, name: str) -> Any:
    try:
      return self.__dict__["_named"][name]
    except KeyError:
      raise AttributeError(f"Composite has no item {name!r} (it has {list(self._named)})") from None

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError("Composite is immutable; build a new one.")

  def __iter__(self) -> Iterator[str]:
    return iter(self._named)

  def __len__(self) -> int:
    return len(self._named)

  def __repr__(self) -> str:
    inner = ", ".join(f"{k}={_short_repr(v)}" for k, v in self._named.items())
    return f"Composite({inner})"

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Composite) and self._named == other._named

  __hash__ = None  # type: ignore[assignment]


def _short_repr(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


class TopLevelCheckpointItem(CheckpointItem):
  """Kauldron's composite style: a NamedTuple or dataclass whose fields are items.

  The field named by `DEFAULT_ITEM` is stored as the item ``default`` (so a
  plain `restore()` finds it); the other fields under their own names.
  `restore` rebuilds the same type. Python refuses a `typing.NamedTuple`
  that also derives from another class, so either derive from a
  `collections.namedtuple`, use a dataclass, or register the NamedTuple:

  >>> import collections, typing
  >>> class State(TopLevelCheckpointItem, collections.namedtuple("State", "params meta")):
  ...   DEFAULT_ITEM = "params"
  >>> State(params={"w": 1}, meta=Json({})).named_items().keys()
  dict_keys(['default', 'meta'])
  >>> @TopLevelCheckpointItem.register
  ... class State2(typing.NamedTuple):
  ...   params: dict
  ...   meta: Json
  ...   DEFAULT_ITEM = "params"
  """

  DEFAULT_ITEM: ClassVar[str | None] = None

  def named_items(self) -> dict[str, Any]:
    return top_level_named_items(self)

  def checkpoint_value(self) -> Any:
    raise TypeError("A TopLevelCheckpointItem is stored as several items; see named_items().")

  def from_restored(self, value: Any) -> Any:
    return value


def _field_names(obj: Any) -> tuple[str, ...]:
  if hasattr(type(obj), "_fields"):
    return tuple(type(obj)._fields)
  if dataclasses.is_dataclass(obj):
    return tuple(f.name for f in dataclasses.fields(obj) if f.init)
  raise TypeError(f"{type(obj).__name__}: a TopLevelCheckpointItem must be a NamedTuple or a dataclass")


def top_level_named_items(obj: Any) -> dict[str, Any]:
  """Field name -> value, with the `DEFAULT_ITEM` field renamed ``default``."""
  default = getattr(obj, "DEFAULT_ITEM", None)
  fields = _field_names(obj)
  if default is not None and default not in fields:
    raise ValueError(f"{type(obj).__name__}.DEFAULT_ITEM = {default!r} is not one of its fields {fields}")
  named = {}
  for name in fields:
    key = _layout.DEFAULT_ITEM if name == default else name
    if key != _layout.DEFAULT_ITEM or name == default:
      validate_item_name(key)
    named[key] = getattr(obj, name)
  return named


def rebuild_top_level(obj: Any, restored: Mapping[str, Any]) -> Any:
  default = getattr(obj, "DEFAULT_ITEM", None)
  kwargs = {}
  for name in _field_names(obj):
    key = _layout.DEFAULT_ITEM if name == default else name
    kwargs[name] = restored[key] if key in restored else getattr(obj, name)
  return type(obj)(**kwargs)


def validate_item_name(name: str) -> None:
  if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum():
    raise ValueError(f"item name {name!r}: use letters, digits, '_' and '-' only")
  if name.startswith("_"):
    raise ValueError(f"item name {name!r}: names starting with '_' are reserved")
  if name in _layout.RESERVED_ITEMS:
    raise ValueError(f"item name {name!r} is reserved by kckpt/Orbax ({sorted(_layout.RESERVED_ITEMS)})")


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a user's state maps onto the items of a step, and back.

  Attributes:
    items: item name -> `CheckpointItem` (or None: restore as saved).
    kind: ``"single"`` (stored as ``default``), ``"composite"`` or ``"top_level"``.
    original: the object the user gave.
  """

  items: dict[str, CheckpointItem | None]
  kind: Literal["single", "composite", "top_level"]
  original: Any = None

  def rebuild(self, restored: Mapping[str, Any]) -> Any:
    if self.kind == "single":
      return restored[_layout.DEFAULT_ITEM]
    if self.kind == "composite":
      return Composite(**restored)
    return rebuild_top_level(self.original, restored)


def layout_of(state: Any) -> Layout:
  """Splits a user's state into named items."""
  if isinstance(state, Composite):
    return Layout({k: None if v is None else as_item(v) for k, v in state.items()}, "composite", state)
  if isinstance(state, TopLevelCheckpointItem):
    named = top_level_named_items(state)
    return Layout({k: None if v is None else as_item(v) for k, v in named.items()}, "top_level", state)
  return Layout({_layout.DEFAULT_ITEM: as_item(state)}, "single", state)
