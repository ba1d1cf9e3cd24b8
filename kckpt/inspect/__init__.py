"""Read-only looks into a run: per-step rows, saved trees, diffs of two steps, verification.

The library behind the ``kckpt`` command, which only renders what these
functions return. Nothing here writes or prints: long reads take an optional
``progress`` callback, called now and then with one short line of status
(``"12/40 leaves"``). Arrays are read a batch of leaves at a time
(`leaf_batches`), never a whole tree.

>>> flatten_metrics({"eval": {"loss": 0.5}, "lr": 0.001})
{'eval.loss': 0.5, 'lr': 0.001}
>>> import numpy as np
>>> compare_values(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
(True, 0.5, 0.25)
"""

from __future__ import annotations

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
from kckpt.inspect._rows import (
  ItemTree,
  StepRow,
  item_tree,
  read_details,
  summary_rows,
)
from kckpt.inspect._verify import (
  Problem,
  StepCheck,
  check_leaf_value,
  verify_pytree_item,
  verify_step,
)

__all__ = [
  "Diff",
  "ItemTree",
  "LeafDiff",
  "Plot",
  "Problem",
  "ProgressFn",
  "StepCheck",
  "StepRow",
  "check_leaf_value",
  "leaf_history",
  "leaf_stats",
  "metric_history",
  "compare_values",
  "diff_item",
  "diff_steps",
  "provenance_differences",
  "step_provenance_differences",
  "disk_bytes",
  "flatten_metrics",
  "format_time",
  "item_tree",
  "leaf_batches",
  "leaf_label",
  "open_reader",
  "read_details",
  "read_json_item",
  "read_pytree",
  "short_error",
  "spec_str",
  "summary_rows",
  "user_items",
  "verify_pytree_item",
  "verify_step",
]
