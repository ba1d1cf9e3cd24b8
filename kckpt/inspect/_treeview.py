"""The saved trees of one step, for a notebook: a collapsible tree of leaves, from metadata alone.

Each leaf shows its path, shape, dtype, bytes, the sharding it was saved
with, and the statistics recorded at save (norm, min, max, mean, non-finite
count) when there are any. In a notebook the view renders through treescope,
the JAX ecosystem's viewer, when it is installed (``pip install
kckpt[notebook]``), and as plain HTML (nested ``<details>``) otherwise.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
from collections.abc import Mapping
from typing import Any

from kckpt import _orbax
from kckpt._types import EPath, Step
from kckpt.inspect._common import human_bytes, open_reader, read_json_item, user_items

# treescope takes seconds past a few thousand leaves (a minute at 10,000): larger trees show as plain HTML.
TREESCOPE_MAX_LEAVES = 2000
JSON_PREVIEW_CHARS = 2000  # of a JSON item's value, in the plain view

_STYLE = """<style>
.kckpt-tree {font-family: system-ui, sans-serif; font-size: 13px}
.kckpt-tree details {margin-left: 14px}
.kckpt-tree summary {cursor: pointer}
.kckpt-tree ul {list-style: none; margin: 0; padding-left: 18px}
.kckpt-tree .kckpt-spec {color: #555}
.kckpt-tree .kckpt-stats {color: #2f4f4f; font-size: 12px}
.kckpt-tree .kckpt-unhealthy {color: #b22222; font-weight: bold}
</style>"""


@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """One saved leaf as the step view shows it (what treescope renders for it).

  Attributes:
    shape: its shape (None for strings).
    dtype: its dtype's name (None when unknown).
    bytes: its size in memory.
    sharding: the sharding it was saved with (`describe_sharding`), None for NumPy leaves.
    stats: ``norm``, ``min``, ``max``, ``mean``, ``nonfinite`` as recorded at save (floating leaves of kckpt steps).
  """

  shape: tuple[int, ...] | None
  dtype: str | None
  bytes: int | None
  sharding: str | None = None
  stats: Mapping[str, float | int] | None = None

  def describe(self) -> str:
    """``(4, 4) float32, 64 B, cpu:0``."""
    spec = f"{self.shape} {self.dtype}" if self.shape is not None else (self.dtype or "?")
    parts = [spec, human_bytes(self.bytes)]
    if self.sharding:
      parts.append(self.sharding)
    return ", ".join(parts)

  def stats_text(self) -> str:
    if not self.stats:
      return ""
    s = self.stats
    text = f"norm {s.get('norm', float('nan')):.4g}, min {s.get('min', float('nan')):.4g}, max {s.get('max', float('nan')):.4g}"
    text += f", mean {s.get('mean', float('nan')):.4g}"
    if s.get("nonfinite"):
      text += f", {s['nonfinite']} non-finite"
    return text


@dataclasses.dataclass(frozen=True)
class TreeView:
  """The saved trees of one step: ``print()`` it in a shell, display it in a notebook.

  Attributes:
    step: the step.
    items: item name -> its leaves, by dotted path, in the tree's order (JSON items: their value).
    json_items: item name -> value of each JSON item.
  """

  step: Step
  items: Mapping[str, Mapping[str, LeafInfo]]
  json_items: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def nbytes(self) -> int:
    return sum(leaf.bytes or 0 for leaves in self.items.values() for leaf in leaves.values())

  def nested(self) -> dict[str, Any]:
    """item -> nested dict of `LeafInfo` (the tree as it was saved), JSON items as their values."""
    out: dict[str, Any] = {item: _strip(_group(leaves)) for item, leaves in self.items.items()}
    out.update(self.json_items)
    return out

  def __str__(self) -> str:
    lines = [f"step {self.step}: {sum(len(v) for v in self.items.values())} leaves, {human_bytes(self.nbytes)}"]
    for item, leaves in self.items.items():
      lines.append(f"{item}:")
      for path, leaf in leaves.items():
        stats = leaf.stats_text()
        lines.append(f"  {path}: {leaf.describe()}" + (f"  [{stats}]" if stats else ""))
    for item in self.json_items:
      lines.append(f"{item}: (JSON)")
    return "\n".join(lines)

  def _repr_html_(self) -> str:
    leaves = sum(len(v) for v in self.items.values())
    if leaves <= TREESCOPE_MAX_LEAVES and importlib.util.find_spec("treescope") is not None:
      return self.treescope_html()
    return self.plain_html()

  def treescope_html(self) -> str:
    """The tree rendered by treescope (which must be installed): collapsible, with each leaf's fields."""
    import treescope  # type: ignore[import-untyped]  # pylint: disable=import-outside-toplevel  # optional: kckpt[notebook]

    return str(treescope.render_to_html(self.nested(), roundtrip_mode=False))

  def plain_html(self) -> str:
    """The tree as nested ``<details>`` (no script): what shows when treescope is not installed."""
    body = "".join(
      f'<details open class="kckpt-item" data-item="{html.escape(item)}"><summary><b>{html.escape(item)}</b>'
      f" ({len(leaves)} leaves, {human_bytes(sum(leaf.bytes or 0 for leaf in leaves.values()))})</summary>"
      + _nodes_html(_group(leaves), item)
      + "</details>"
      for item, leaves in self.items.items()
    )
    body += "".join(
      f'<details class="kckpt-item" data-item="{html.escape(item)}"><summary><b>{html.escape(item)}</b> (JSON)</summary>'
      f"<pre>{html.escape(_preview(value))}</pre></details>"
      for item, value in self.json_items.items()
    )
    return f'{_STYLE}<div class="kckpt-tree"><div>step {self.step}: {human_bytes(self.nbytes)}</div>{body}</div>'


def _preview(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= JSON_PREVIEW_CHARS else text[:JSON_PREVIEW_CHARS] + f" ... ({len(text)} characters)"


def split_path(path: str) -> list[str]:
  r"""A leaf's dotted path as its keys: ``\.`` is a dot inside a key (kckpt's escaped keys), ``\\`` a backslash.

  >>> split_path("params.dense.w"), split_path(r"emb.a\.b")
  (['params', 'dense', 'w'], ['emb', 'a.b'])
  """
  keys: list[str] = []
  key: list[str] = []
  i = 0
  while i < len(path):
    c = path[i]
    if c == "\\" and i + 1 < len(path):
      key.append(path[i + 1])
      i += 2
      continue
    if c == ".":
      keys.append("".join(key))
      key = []
    else:
      key.append(c)
    i += 1
  keys.append("".join(key))
  return keys


def _group(leaves: Mapping[str, LeafInfo]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for path, leaf in leaves.items():
    node = root
    *parents, name = split_path(path)
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = (path, leaf)
  return root


def _strip(node: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v[1] if isinstance(v, tuple) else _strip(v) for k, v in node.items()}


def _nodes_html(node: Mapping[str, Any], item: str, depth: int = 0) -> str:
  parts = []
  for name, child in node.items():
    if isinstance(child, tuple):
      path, leaf = child
      stats = leaf.stats_text()
      bad = leaf.stats and leaf.stats.get("nonfinite")
      parts.append(
        f'<li class="kckpt-leaf" data-path="{html.escape(path)}"><code>{html.escape(name)}</code> '
        f'<span class="kckpt-spec">{html.escape(leaf.describe())}</span>'
        + (f' <span class="kckpt-stats{" kckpt-unhealthy" if bad else ""}">{html.escape(stats)}</span>' if stats else "")
        + "</li>"
      )
    else:
      count = _count(child)
      parts.append(
        f'<li><details{" open" if depth == 0 else ""} class="kckpt-node"><summary><code>{html.escape(name)}</code>'
        f" ({count} leaves)</summary>" + _nodes_html(child, item, depth + 1) + "</details></li>"
      )
  return "<ul>" + "".join(parts) + "</ul>"


def _count(node: Mapping[str, Any]) -> int:
  return sum(1 if isinstance(c, tuple) else _count(c) for c in node.values())


def step_tree(step_path: EPath, step: Step) -> TreeView:
  """The `TreeView` of the step at `step_path`: its items' metadata, shardings and statistics; no array read.

  >>> import tempfile, numpy as np, kckpt
  >>> with kckpt.Checkpointer(workdir=tempfile.mkdtemp(), save_interval_steps=1, async_save=False) as ckpt:
  ...   _ = ckpt.save({"w": np.ones((2, 3), np.float32), "step": 7}, step=1)
  >>> print(step_tree(ckpt.step_details(1).path, 1))
  step 1: 2 leaves, 32 B
  default:
    step: () int64, 8 B
    w: (2, 3) float32, 24 B  [norm 2.449, min 1, max 1, mean 1]
  """
  stats = _orbax.read_leaf_stats(step_path)
  items: dict[str, dict[str, LeafInfo]] = {}
  json_items: dict[str, Any] = {}
  for name, fmt in user_items(step_path).items():
    if fmt != "pytree":
      json_items[name] = read_json_item(step_path, name)
      continue
    saved = open_reader(step_path / name).leaves.values()  # metadata only (no walk of the folder for its size)
    shardings = _orbax.read_shardings(step_path / name)
    item_stats = stats.get(name, {})
    items[name] = {
      leaf.path: LeafInfo(
        shape=leaf.shape,
        dtype=str(leaf.dtype) if leaf.dtype is not None else (leaf.kind if leaf.kind != "array" else None),
        bytes=leaf.nbytes,
        sharding=shardings.get(leaf.path),
        stats={k: v for k, v in item_stats[leaf.path].items() if k != "size"} if leaf.path in item_stats else None,
      )
      for leaf in saved
    }
  return TreeView(step=step, items=items, json_items=json_items)
