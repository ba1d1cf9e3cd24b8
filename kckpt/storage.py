"""How arrays are written to disk.

`StorageOptions` is the on-disk format and the I/O limits of a `Checkpointer`
(the field `Checkpointer.storage`); its defaults were chosen by
``python -m benchmarks.run`` (see the speed guide, docs/guides/speed.md). What each save and
restore cost is `kckpt.telemetry`'s.

Only the writer looks at `StorageOptions`: a restore reads the format of each
checkpoint from the checkpoint itself, so kckpt (and plain Orbax) read
checkpoints written with any options, Orbax's defaults included.
"""

from __future__ import annotations

import dataclasses
import numbers


def _check_gb(name: str, value: float | None) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
    raise ValueError(f"StorageOptions.{name} must be a positive number of GB or None, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageOptions:
  """The on-disk format and I/O limits of saves (hashable, comparable).

  The defaults are Orbax's format without compression: the fastest choice
  that keeps Orbax's file layout in kckpt's benchmark (see
  docs/guides/speed.md). Each field is an Orbax `PyTreeCheckpointHandler` option.

  Attributes:
    compression: compress array chunks with zstd (Orbax's default is True).
      Float weights barely compress (8% of random-normal float32 weights,
      22% of bfloat16 ones) while zstd cut save and restore speed by 35-60%
      in kckpt's benchmark, so kckpt writes them uncompressed. Turn it on for
      states that do compress (mostly zeros, integer tables) when disk space
      matters more than time.
    use_ocdbt: store all arrays of an item in one OCDBT key-value database
      (a few large files) rather than a folder of chunk files per array.
      Orbax's default, and kckpt's: far fewer files for states of many
      leaves, and what object stores (``gs://``) and multi-process saves are
      tuned for. Without it, saves to a local disk were usually faster (up
      to 40%), restores no faster, at two or more files per array.
    use_zarr3: write arrays as Zarr v3 rather than Zarr v2 (Orbax's default
      is v2, and kckpt's: Orbax's Zarr v3 layout wraps each chunk in a
      sharding codec, which cost a GPT-2-sized save about 40% more CPU time
      here and made restores no faster).
    checksums: a CRC32C of every saved shard of every array (the bytes as
      written), computed with the CPU's CRC instruction in the background
      thread that already reduces each array to its statistics, and stored
      in the step (``_KCKPT_CHECKSUMS.json``). kckpt's restores and ``kckpt
      verify`` check every array they read against it: a flipped bit is a
      `CheckpointReadError` naming the step, item and leaf, not other
      numbers. The arrays' files stay plain Orbax's (plain Orbax reads them,
      without the check). Works with any format; see docs/guides/integrity.md
      for what it costs.
    save_concurrent_gb: at most this many GB (10**9 bytes) being written at
      once (None: Orbax's default, 96 GB). Lower it when a save must not
      double the host memory of a very large state. It must be at least the
      size of the largest array (shard): Orbax fails the save otherwise.
    restore_concurrent_gb: at most this many GB being read at once (None:
      Orbax's default, 96 GB). It must exceed the largest array: a restore it
      cannot fit raises before anything is read or the target is freed. A
      low limit slows restores of many leaves down (Orbax wakes every
      waiting read at each release) and was not measured to lower peak
      memory.

  >>> StorageOptions() == StorageOptions(compression=False, use_ocdbt=True, use_zarr3=False, checksums=True)
  True
  >>> StorageOptions.orbax_defaults().compression
  True
  """

  compression: bool = False
  use_ocdbt: bool = True
  use_zarr3: bool = False
  checksums: bool = True
  save_concurrent_gb: float | None = None
  restore_concurrent_gb: float | None = None

  def __post_init__(self):
    for name in ("compression", "use_ocdbt", "use_zarr3", "checksums"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"StorageOptions.{name} must be a bool, got {getattr(self, name)!r}")
    _check_gb("save_concurrent_gb", self.save_concurrent_gb)
    _check_gb("restore_concurrent_gb", self.restore_concurrent_gb)

  @classmethod
  def orbax_defaults(cls) -> StorageOptions:
    """What a plain Orbax `CheckpointManager` writes: OCDBT, Zarr v2, zstd."""
    return cls(compression=True, use_ocdbt=True, use_zarr3=False, checksums=False)
