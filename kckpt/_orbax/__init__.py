"""The only code in kckpt that imports Orbax or knows its file format.

A narrow API over Orbax 0.12, in four parts:

- writing (`Writer`): one Orbax `CheckpointManager` per run, with kckpt's
  retention deciding what stays, durable atomic commits, and deletions that a
  reader never sees half done;
- reading (`read_tree_into`, `read_items`, `read_leaves`, `LeafReader`): a
  stand-alone Orbax `Checkpointer` on the step folder, so that a reader never
  needs a manager, never writes, and avoids the manager's single-item mode
  (which rejects `Composite` args once it sees a ``default/`` folder);
- metadata (`saved_leaf_specs`, `metadata_as_shape_dtype`, `SavedLeaf`) and
  the step folder's files (`read_step_metadata`, `item_formats`, `step_time`,
  `is_temporary_name`, ...), read without loading any array;
- `install_s3_support`, the one change kckpt makes to Orbax, installed at the
  first ``s3://`` path (never at import).

Every reach into an Orbax or JAX private name is listed in the table of
`kckpt._orbax._reaches`, with a check (run by the tests) that fails, naming
the reach, when an upgrade breaks it.

Only the step folder's files (`kckpt._orbax._format`: plain JSON and folder
names, no Orbax) are imported with this package; every other name is
resolved on first use (PEP 562), so a listing (``kckpt ls``, `RunIndex`)
never imports JAX, Orbax or TensorStore.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kckpt._orbax._format import (
  CHECKSUMS_FILE,
  COMMIT_MARKER,
  CRC32C_CODEC,
  CRC32C_SHARDS,
  HEALTH_FILE,
  LEAF_STATS_FILE,
  METRICS_ITEM,
  STEP_METADATA_FILE,
  TMP_MARKER,
  ItemFormat,
  custom_metadata,
  escaped_items,
  is_committed,
  is_step_folder,
  is_temporary_name,
  item_formats,
  needs_commit_marker,
  read_leaf_stats,
  read_step_checksums,
  read_step_health,
  read_step_metadata,
  read_step_metrics,
  remove_step_folder,
  step_checksums,
  step_provenance,
  step_tag,
  step_time,
)

# Names that need Orbax (or JAX, TensorStore) -> the module that defines them, imported on first use.
_LAZY = {
  "StatsCollector": "_leafstats",
  "leaf_stats": "_leafstats",
  "merge_partials": "_leafstats",
  "merge_checksums": "_leafstats",
  "leaf_checksums": "_checksums",
  "checking": "_read_checks",
  "open_collector": "_leafstats",
  "close_collector": "_leafstats",
  "reduce_shards": "_leafstats",
  "before_commit": "_commit",
  "DurableRenameTemporaryPath": "_commit",
  "damaged_files": "_files",
  "MultiprocessingOptions": "_handlers",
  "SavedLeaf": "_metadata",
  "metadata_as_shape_dtype": "_metadata",
  "pytree_metadata": "_metadata",
  "saved_leaf_specs": "_metadata",
  "read_shardings": "_metadata",
  "install_s3_support": "_patches",
  "RESTORE_BATCH_BYTES": "_reader",
  "ItemRead": "_reader",
  "LeafReader": "_reader",
  "abstract_target": "_reader",
  "is_read_error": "_reader",
  "match_scalar_types": "_reader",
  "read_each": "_reader",
  "read_items": "_reader",
  "read_leaves": "_reader",
  "read_tree_into": "_reader",
  "read_storage": "_reader",
  "restore_batches": "_reader",
  "RESTORE_TREE_VISITS": "_reader",
  "release": "_reader",
  "ItemWrite": "_writer",
  "Writer": "_writer",
}
_SUBMODULES = (
  "_background",
  "_checksums",
  "_commit",
  "_files",
  "_format",
  "_handlers",
  "_inflight",
  "_metadata",
  "_patches",
  "_reaches",
  "_read_progress",
  "_read_checks",
  "_reader",
  "_writer",
)


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module(f"kckpt._orbax.{_LAZY[name]}"), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"kckpt._orbax.{name}")  # `_orbax._metadata` before anything imported it
  else:
    raise AttributeError(f"module 'kckpt._orbax' has no attribute {name!r}")
  globals()[name] = value
  return value


if TYPE_CHECKING:
  from kckpt._orbax._checksums import leaf_checksums
  from kckpt._orbax._commit import DurableRenameTemporaryPath, before_commit
  from kckpt._orbax._files import damaged_files
  from kckpt._orbax._handlers import MultiprocessingOptions
  from kckpt._orbax._leafstats import StatsCollector
  from kckpt._orbax._leafstats import close_collector
  from kckpt._orbax._leafstats import leaf_stats
  from kckpt._orbax._leafstats import merge_checksums
  from kckpt._orbax._leafstats import merge_partials
  from kckpt._orbax._leafstats import open_collector
  from kckpt._orbax._leafstats import reduce_shards
  from kckpt._orbax._metadata import SavedLeaf, metadata_as_shape_dtype, pytree_metadata, read_shardings, saved_leaf_specs
  from kckpt._orbax._patches import install_s3_support
  from kckpt._orbax._read_checks import checking
  from kckpt._orbax._reader import (
    RESTORE_BATCH_BYTES,
    RESTORE_TREE_VISITS,
    ItemRead,
    LeafReader,
    abstract_target,
    is_read_error,
    match_scalar_types,
    read_each,
    read_items,
    read_leaves,
    read_storage,
    read_tree_into,
    release,
    restore_batches,
  )
  from kckpt._orbax._writer import ItemWrite, Writer

__all__ = [
  "CHECKSUMS_FILE",
  "COMMIT_MARKER",
  "CRC32C_CODEC",
  "CRC32C_SHARDS",
  "HEALTH_FILE",
  "LEAF_STATS_FILE",
  "DurableRenameTemporaryPath",
  "ItemFormat",
  "ItemRead",
  "ItemWrite",
  "LeafReader",
  "METRICS_ITEM",
  "MultiprocessingOptions",
  "RESTORE_BATCH_BYTES",
  "STEP_METADATA_FILE",
  "StatsCollector",
  "SavedLeaf",
  "TMP_MARKER",
  "Writer",
  "abstract_target",
  "before_commit",
  "checking",
  "close_collector",
  "custom_metadata",
  "damaged_files",
  "escaped_items",
  "install_s3_support",
  "is_read_error",
  "is_committed",
  "is_step_folder",
  "is_temporary_name",
  "item_formats",
  "leaf_checksums",
  "leaf_stats",
  "match_scalar_types",
  "merge_checksums",
  "merge_partials",
  "metadata_as_shape_dtype",
  "needs_commit_marker",
  "open_collector",
  "pytree_metadata",
  "read_each",
  "reduce_shards",
  "read_items",
  "read_leaves",
  "read_leaf_stats",
  "read_step_checksums",
  "read_step_health",
  "read_step_metadata",
  "read_step_metrics",
  "read_tree_into",
  "read_storage",
  "restore_batches",
  "RESTORE_TREE_VISITS",
  "release",
  "remove_step_folder",
  "saved_leaf_specs",
  "read_shardings",
  "step_checksums",
  "step_provenance",
  "step_tag",
  "step_time",
]
