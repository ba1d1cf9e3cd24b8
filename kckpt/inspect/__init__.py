"""Read-only looks into a run: per-step rows, saved trees, diffs of two steps, verification.

The library behind the ``kckpt`` command, which only renders what these
functions return. Nothing here writes or prints: long reads take an optional
``progress`` callback, called now and then with one short line of status
(``"12/40 leaves"``). Arrays are read a batch of leaves at a time
(`leaf_batches`), never a whole tree.

>>> from kckpt import inspect
>>> inspect.flatten_metrics({"eval": {"loss": 0.5}, "lr": 0.001})
{'eval.loss': 0.5, 'lr': 0.001}
>>> import numpy as np
>>> inspect.compare_values(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
(True, 0.5, 0.25)

Names are resolved on first use (PEP 562): ``kckpt ls`` imports the rows
module only, not the diff, plot and verify ones.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module of this package that defines it.
_PUBLIC = {
  "ProgressFn": "_common",
  "disk_bytes": "_common",
  "flatten_metrics": "_common",
  "format_time": "_common",
  "human_bytes": "_common",
  "leaf_batches": "_common",
  "leaf_label": "_common",
  "leaf_stats": "_common",
  "open_reader": "_common",
  "read_json_item": "_common",
  "read_pytree": "_common",
  "short_error": "_common",
  "spec_str": "_common",
  "user_items": "_common",
  "Diff": "_diff",
  "LeafDiff": "_diff",
  "compare_values": "_diff",
  "diff_item": "_diff",
  "diff_steps": "_diff",
  "provenance_differences": "_diff",
  "step_provenance_differences": "_diff",
  "Plot": "_plot",
  "leaf_history": "_plot",
  "metric_history": "_plot",
  "ItemTree": "_rows",
  "StepRow": "_rows",
  "item_tree": "_rows",
  "read_details": "_rows",
  "summary_rows": "_rows",
  "LeafInfo": "_treeview",
  "TreeView": "_treeview",
  "step_tree": "_treeview",
  "Problem": "_verify",
  "StepCheck": "_verify",
  "check_leaf_value": "_verify",
  "verify_pytree_item": "_verify",
  "verify_step": "_verify",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name not in _PUBLIC:
    raise AttributeError(f"module 'kckpt.inspect' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"kckpt.inspect.{_PUBLIC[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *__all__])


if TYPE_CHECKING:
  from kckpt.inspect._common import (
    ProgressFn,
    disk_bytes,
    flatten_metrics,
    format_time,
    leaf_batches,
    leaf_label,
    leaf_stats,
    open_reader,
    read_json_item,
    read_pytree,
    short_error,
    spec_str,
    user_items,
  )
  from kckpt.inspect._diff import (
    Diff,
    LeafDiff,
    compare_values,
    diff_item,
    diff_steps,
    provenance_differences,
    step_provenance_differences,
  )
  from kckpt.inspect._plot import Plot
  from kckpt.inspect._plot import leaf_history
  from kckpt.inspect._plot import metric_history
  from kckpt.inspect._rows import ItemTree, StepRow, item_tree, read_details, summary_rows
  from kckpt.inspect._treeview import LeafInfo
  from kckpt.inspect._treeview import TreeView
  from kckpt.inspect._treeview import step_tree
  from kckpt.inspect._verify import Problem, StepCheck, check_leaf_value, verify_pytree_item, verify_step
