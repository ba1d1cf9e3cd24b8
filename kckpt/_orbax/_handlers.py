"""The Orbax handlers kckpt writes and reads pytree items with (its on-disk format)."""

from __future__ import annotations

import orbax.checkpoint as ocp

from kckpt import storage as storage_lib

MultiprocessingOptions = ocp.options.MultiprocessingOptions


def pytree_handler(
  storage: storage_lib.StorageOptions, multiprocessing_options: MultiprocessingOptions | None
) -> ocp.PyTreeCheckpointHandler:
  """The Orbax handler of every pytree item, with kckpt's on-disk format."""
  return ocp.PyTreeCheckpointHandler(
    use_ocdbt=storage.use_ocdbt,
    use_zarr3=storage.use_zarr3,
    use_compression=storage.compression,
    save_concurrent_gb=storage.save_concurrent_gb,  # type: ignore[arg-type]  # Orbax multiplies by 1e9
    restore_concurrent_gb=storage.restore_concurrent_gb,  # type: ignore[arg-type]
    multiprocessing_options=multiprocessing_options or MultiprocessingOptions(),
  )


def handler_registry(
  storage: storage_lib.StorageOptions | None, multiprocessing_options: MultiprocessingOptions | None
) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """A registry whose default handler for `PyTreeSave`/`PyTreeRestore` uses `storage`.

  Registered for item None, Orbax uses the handler for every item name it
  meets (`CompositeCheckpointHandler._get_or_set_handler`), so a `Composite`
  of any names is written with the same options. JSON items fall back to
  Orbax's global registry, as before.
  """
  handler = pytree_handler(storage or storage_lib.StorageOptions(), multiprocessing_options)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(None, ocp.args.PyTreeSave, handler)
  registry.add(None, ocp.args.PyTreeRestore, handler)
  return registry
