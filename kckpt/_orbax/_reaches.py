"""Every private name of Orbax, JAX (or Python) that kckpt reaches, and a check of each.

kckpt pins ``orbax-checkpoint>=0.12.8,<0.13`` and ``jax<0.13``; within those
ranges an upgrade may still move a private name. `check_all()` (run by the test
suite) imports or inspects each reach and returns one line per broken one,
naming it, so an upgrade fails loudly in CI instead of at a user's save.

- ``jax._src.distributed.global_state.client`` (`kckpt.multihost`): the
  coordination service's key-value store and bounded barriers. No public
  accessor in JAX; Orbax reads the same attribute.
- ``orbax.checkpoint._src.serialization.tensorstore_utils._normalize_path``
  and ``._use_gcs_driver``, ``orbax.checkpoint._src.path.gcs_utils.get_kvstore_for_gcs``
  (`_patches`, installed at the first ``s3://`` path): keep ``s3://`` in paths,
  send it down the spec builders' remote branch, return TensorStore's ``s3``
  kvstore spec. Orbax 0.12.8 knows only gs:// (Orbax issue #359).
- ``tensorstore_utils.build_kvstore_tspec`` (`_metadata`): open an item's
  kvstore to read all Zarr JSONs in one pass, 25x faster than
  `PyTreeCheckpointHandler.metadata`; with the ``_METADATA`` keys
  ``tree_metadata``, ``key_metadata``, ``value_metadata.value_type``,
  ``use_ocdbt``, ``use_zarr3`` (anything unexpected falls back to Orbax).
- ``tensorstore_utils.build_array_write_spec``, looked up on the module by
  ``jax_array_handlers`` and ``type_handlers`` (`_checksums`): tell which
  array (item folder, parameter name) a write spec is for. And
  ``serialization.async_serialize_from_host`` (called by
  ``jax_array_handlers`` on the host copies of an array's shards): reduce
  them to per-leaf statistics and a CRC32C per shard alongside the write.
  Orbax has no per-array hook.
- ``tensorstore_utils.build_array_read_spec`` and
  ``serialization.async_deserialize``, looked up on their modules by
  ``jax_array_handlers`` and ``type_handlers``, and
  ``type_handlers.NumpyHandler.deserialize`` (`_read_checks`): tie each
  array read from a step with checksums to its recorded shards, and check
  them. Orbax has no read hook either.
- ``serialization._read_shard``, looked up on the module by
  ``_read_array_index_and_device_put`` (`_read_progress`): report each shard
  a restore reads to its progress bar, and make it wait its turn within the
  restore's bound on the bytes read at once (`_inflight`). Orbax reads a tree
  in one call and has no progress callback; its byte limiter wakes every
  waiting read at each release.
- ``tensorstore_utils._build_ocdbt_kvstore_tspec``, looked up on its module
  by ``build_kvstore_tspec`` (`_kvstore_specs`): build each folder's OCDBT
  spec once and give each array a copy with its ``path``; Orbax's builder
  calls TensorStore's leaking ``to_json`` for every array saved or read.
- ``asyncio_utils._run_sync_via_new_loop``, looked up on its module by
  ``run_sync`` (`_drain`): while a kckpt read runs, a failed Orbax call
  waits for the tasks it started before closing its loop, so no read goes
  on (and prints tracebacks into a closed loop) after the error is raised.
- ``PyTreeCheckpointHandler._handler_impl._read_metadata_file`` and
  ``InternalTreeMetadata.as_nested_tree`` (leaves ``ValueMetadataEntry``:
  ``value_type``, ``skip_deserialize``, ``write_shape``),
  ``metadata.empty_values``, ``tree.utils.to_flat_dict``/``from_flat_dict``,
  the leaf classes of ``metadata.value`` and ``metadata.sharding.from_serialized_string``
  (`_metadata.as_saved_restore_args`, `_metadata.pytree_metadata`): the saved
  tree, its value types and the metadata objects Orbax's `metadata()` builds,
  from the item's small files, without that `metadata()`, which opens every
  array and leaks memory per array through TensorStore's ``to_json``.
  Anything unexpected falls back to `metadata()`.
- ``CheckpointManager._checkpoint_deleter`` (`_writer`): a deleter that renames
  before removing, so readers never see half a step. No option takes one.
- ``CheckpointManager._finalize`` (`_writer`): the moment a step is committed,
  for `last_save_stats`. `AsyncOptions.post_finalization_callback` runs before
  the commit, gets no step, and is refused for sync saves.
- ``CheckpointManager._checkpoints`` and ``._load_checkpoint_infos(skip_metadata_read=True)``
  (`_writer`): re-list steps after a failed save, or before deleting a step
  another process wrote, without reading every step's metadata (`reload()`
  reads it all).
- ``threading._register_atexit`` (Python's own, `kckpt._session`): finish the
  async save in flight when a script ends without `close()`, before Python
  joins threads and shuts the thread pools Orbax's background save needs
  (``atexit`` runs too late: the exit hangs first). concurrent.futures uses it.
- ``CheckpointManagerOptions.temporary_path_class`` (public, deprecated since
  0.12.3; `_commit`): write kckpt's files of the step (health, leaf
  statistics) and fsync every file before the atomic rename or commit file.
  `atomicity_options`, its replacement, picks only Orbax's own classes.

Replaced by public API in this release: the finalize thread
(`is_saving_in_progress()`), ``tensorstore_utils.get_ts_context``
(`ocp.serialization.get_ts_context`), the absl log filter on Orbax's metrics
warning (metrics are a JSON item, Orbax tracks none), and ``_atomicity``'s
rename class (`ocp.path.atomicity.AtomicRenameTemporaryPath`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Reach:
  """One private name kckpt relies on, and how to check it is still there."""

  name: str
  check: Callable[[], bool]


def _has(module: str, *names: str) -> Callable[[], bool]:
  def check() -> bool:
    mod = importlib.import_module(module)
    return all(callable(getattr(mod, n, None)) for n in names)

  return check


def _jax_client() -> bool:
  distributed = importlib.import_module("jax._src.distributed")
  return hasattr(getattr(distributed, "global_state", None), "client")


def _manager_has(*names: str) -> Callable[[], bool]:
  def check() -> bool:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    return all(hasattr(ocp.CheckpointManager, n) for n in names if not n.startswith("self.")) and all(
      n[len("self.") :] in inspect.getsource(ocp.CheckpointManager.__init__) for n in names if n.startswith("self.")
    )

  return check


def _finalize_signature() -> bool:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return list(inspect.signature(ocp.CheckpointManager._finalize).parameters) == ["self", "step", "steps_to_remove"]  # pylint: disable=protected-access


def _load_infos_signature() -> bool:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  params = inspect.signature(ocp.CheckpointManager._load_checkpoint_infos).parameters  # pylint: disable=protected-access
  return "skip_metadata_read" in params


def _temporary_path_class_option() -> bool:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return "temporary_path_class" in {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}


def _array_spec_builder_looked_up_on_the_module() -> bool:
  callers = ("jax_array_handlers", "type_handlers")
  sources = [inspect.getsource(importlib.import_module(f"orbax.checkpoint._src.serialization.{m}")) for m in callers]
  return callable(getattr(importlib.import_module(_TS_UTILS), "build_array_write_spec", None)) and all(
    "ts_utils.build_array_write_spec(" in source for source in sources
  )


def _host_serializer_looked_up_on_the_module() -> bool:
  handlers = inspect.getsource(importlib.import_module("orbax.checkpoint._src.serialization.jax_array_handlers"))
  serialization = importlib.import_module("orbax.checkpoint._src.serialization.serialization")
  return callable(getattr(serialization, "async_serialize_from_host", None)) and (
    "serialization.async_serialize_from_host(" in handlers
  )


def _read_spec_builder_and_deserializer_looked_up_on_the_modules() -> bool:
  handlers = {
    m: inspect.getsource(importlib.import_module(f"orbax.checkpoint._src.serialization.{m}"))
    for m in ("jax_array_handlers", "type_handlers")
  }
  serialization = importlib.import_module("orbax.checkpoint._src.serialization.serialization")
  type_handlers = importlib.import_module("orbax.checkpoint._src.serialization.type_handlers")
  deserialize = inspect.signature(serialization.async_deserialize).parameters
  return (
    callable(getattr(importlib.import_module(_TS_UTILS), "build_array_read_spec", None))
    and all("ts_utils.build_array_read_spec(" in source for source in handlers.values())
    and "serialization.async_deserialize(" in handlers["jax_array_handlers"]
    and list(deserialize)[:2] == ["user_sharding", "tensorstore_spec"]
    and list(inspect.signature(type_handlers.NumpyHandler.deserialize).parameters) == ["self", "infos", "args"]
  )


def _shard_reader_looked_up_on_the_module() -> bool:
  serialization = importlib.import_module("orbax.checkpoint._src.serialization.serialization")
  reader = getattr(serialization, "_read_shard", None)
  if not callable(reader):
    return False
  wanted = ["t", "new_shard_shape", "dtype", "requested_domain", "restricted_domain"]
  return list(inspect.signature(reader).parameters) == wanted and "await _read_shard(" in inspect.getsource(
    serialization._read_array_index_and_device_put  # pylint: disable=protected-access
  )


def _loop_runner_looked_up_on_the_module() -> bool:
  asyncio_utils = importlib.import_module("orbax.checkpoint._src.asyncio_utils")
  runner = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
  return (
    callable(runner)
    and list(inspect.signature(runner).parameters) == ["coro"]
    and "_run_sync_via_new_loop(" in inspect.getsource(asyncio_utils.run_sync)
  )


def _kvstore_spec_builder_looked_up_on_the_module() -> bool:
  from kckpt._orbax import _kvstore_specs  # pylint: disable=import-outside-toplevel

  ts_utils = importlib.import_module(_TS_UTILS)
  builder = getattr(ts_utils, "_build_ocdbt_kvstore_tspec", None)
  if builder is _kvstore_specs._build_ocdbt_kvstore_tspec:  # pylint: disable=protected-access  # installed: Orbax's is kept
    builder = _kvstore_specs._original  # pylint: disable=protected-access
  wanted = ["directory", "name", "process_spec", "write_options", "temporary_metadata_context"]
  return (
    callable(builder)
    and list(inspect.signature(builder).parameters) == wanted
    and "_build_ocdbt_kvstore_tspec(" in inspect.getsource(ts_utils.build_kvstore_tspec)
    # The array's name only sets the spec's "path": one spec per folder serves every array in it.
    and "kv_spec['path'] = name" in inspect.getsource(builder)
  )


def _metadata_file_reader() -> bool:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.metadata import empty_values  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.metadata import sharding  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.metadata import tree  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.metadata import value  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.metadata import value_metadata_entry  # pylint: disable=import-outside-toplevel
  from orbax.checkpoint._src.tree import utils  # pylint: disable=import-outside-toplevel

  impl = ocp.PyTreeCheckpointHandler()._handler_impl  # pylint: disable=protected-access

  def fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}

  return (
    inspect.iscoroutinefunction(getattr(impl, "_read_metadata_file", None))
    and callable(getattr(tree.InternalTreeMetadata, "as_nested_tree", None))
    and {"value_type", "skip_deserialize", "write_shape"} <= fields(value_metadata_entry.ValueMetadataEntry)
    and callable(empty_values.is_empty_typestr)
    and callable(empty_values.get_empty_value_from_typestr)
    and callable(utils.to_flat_dict)
    and callable(utils.from_flat_dict)
    and {"name", "directory", "shape", "sharding", "dtype", "storage"} <= fields(value.ArrayMetadata)
    and {"name", "directory", "dtype"} <= fields(value.ScalarMetadata)
    and {"name", "directory"} <= fields(value.StringMetadata) <= fields(value.Metadata) | {"name", "directory"}
    and {"chunk_shape", "write_shape", "zarr_metadata"} <= fields(value.StorageMetadata)
    and callable(value.ZarrMetadata.from_json)
    and callable(sharding.from_serialized_string)
  )


_TS_UTILS = "orbax.checkpoint._src.serialization.tensorstore_utils"
_GCS_UTILS = "orbax.checkpoint._src.path.gcs_utils"

REACHES = (
  Reach("jax._src.distributed.global_state.client", _jax_client),
  Reach("threading._register_atexit", _has("threading", "_register_atexit")),
  Reach(f"{_TS_UTILS}._normalize_path", _has(_TS_UTILS, "_normalize_path")),
  Reach(f"{_TS_UTILS}._use_gcs_driver", _has(_TS_UTILS, "_use_gcs_driver")),
  Reach(f"{_TS_UTILS}.build_kvstore_tspec", _has(_TS_UTILS, "build_kvstore_tspec")),
  Reach(f"{_GCS_UTILS}.get_kvstore_for_gcs", _has(_GCS_UTILS, "get_kvstore_for_gcs")),
  Reach(f"{_TS_UTILS}.build_array_write_spec (as called by the array handlers)", _array_spec_builder_looked_up_on_the_module),
  Reach("serialization.async_serialize_from_host (as called by the array handler)", _host_serializer_looked_up_on_the_module),
  Reach("serialization._read_shard (as called by the shard reader)", _shard_reader_looked_up_on_the_module),
  Reach("asyncio_utils._run_sync_via_new_loop (as called by run_sync)", _loop_runner_looked_up_on_the_module),
  Reach(
    f"{_TS_UTILS}._build_ocdbt_kvstore_tspec (as called by build_kvstore_tspec)", _kvstore_spec_builder_looked_up_on_the_module
  ),
  Reach(
    f"{_TS_UTILS}.build_array_read_spec, serialization.async_deserialize, NumpyHandler.deserialize",
    _read_spec_builder_and_deserializer_looked_up_on_the_modules,
  ),
  Reach(
    "BasePyTreeCheckpointHandler._read_metadata_file, InternalTreeMetadata.as_nested_tree, metadata.value", _metadata_file_reader
  ),
  Reach("CheckpointManager._checkpoint_deleter", _manager_has("self._checkpoint_deleter")),
  Reach("CheckpointManager._finalize(step, steps_to_remove)", _finalize_signature),
  Reach("CheckpointManager._checkpoints", _manager_has("self._checkpoints")),
  Reach("CheckpointManager._load_checkpoint_infos(skip_metadata_read=)", _load_infos_signature),
  Reach("CheckpointManagerOptions.temporary_path_class", _temporary_path_class_option),
)


def check_all() -> list[str]:
  """One line per reach that is gone or changed shape (empty when all hold)."""
  broken = []
  for reach in REACHES:
    try:
      ok = reach.check()
    except Exception as e:  # pylint: disable=broad-exception-caught  # an import error is the finding itself
      broken.append(f"{reach.name}: {type(e).__name__}: {e}")
      continue
    if not ok:
      broken.append(f"{reach.name}: not found (or its signature changed) in this Orbax/JAX")
  return broken
