"""How arrays are written to disk, and what each save and restore cost.

`StorageOptions` is the on-disk format and the I/O limits of a `Checkpointer`
(the field `Checkpointer.storage`); its defaults were chosen by
``python -m benchmarks.run`` (see the README's table). `TransferStats` is what
one save or restore moved and how long it took (`Checkpointer.last_save_stats`,
`Checkpointer.last_restore_stats`).

Only the writer looks at `StorageOptions`: a restore reads the format of each
checkpoint from the checkpoint itself, so kckpt (and plain Orbax) read
checkpoints written with any options, Orbax's defaults included.
"""

from __future__ import annotations

import dataclasses
import numbers

from kckpt._types import Step


def _check_gb(name: str, value: float | None) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
    raise ValueError(f"StorageOptions.{name} must be a positive number of GB or None, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageOptions:
  """The on-disk format and I/O limits of saves (hashable, comparable).

  The defaults are Orbax's format without compression: the fastest choice
  that keeps Orbax's file layout in kckpt's benchmark (see the README,
  "Speed"). Each field is an Orbax `PyTreeCheckpointHandler` option.

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
      is v2). Zarr v2 is kept: v3 was not consistently faster, and v2 is
      readable by every Orbax release.
    save_concurrent_gb: at most this many GB (10**9 bytes) being written at
      once (None: Orbax's default, 96 GB). Lower it when a save must not
      double the host memory of a very large state. It must be at least the
      size of the largest array (shard): Orbax fails the save otherwise.
    restore_concurrent_gb: at most this many GB being read at once (None:
      Orbax's default, 96 GB); also at least the largest array.

  >>> StorageOptions()
  StorageOptions(compression=False, use_ocdbt=True, use_zarr3=False, save_concurrent_gb=None, restore_concurrent_gb=None)
  >>> StorageOptions.orbax_defaults().compression
  True
  """

  compression: bool = False
  use_ocdbt: bool = True
  use_zarr3: bool = False
  save_concurrent_gb: float | None = None
  restore_concurrent_gb: float | None = None

  def __post_init__(self):
    for name in ("compression", "use_ocdbt", "use_zarr3"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"StorageOptions.{name} must be a bool, got {getattr(self, name)!r}")
    _check_gb("save_concurrent_gb", self.save_concurrent_gb)
    _check_gb("restore_concurrent_gb", self.restore_concurrent_gb)

  @classmethod
  def orbax_defaults(cls) -> StorageOptions:
    """What a plain Orbax `CheckpointManager` writes: OCDBT, Zarr v2, zstd."""
    return cls(compression=True, use_ocdbt=True, use_zarr3=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferStats:
  """What one save or restore moved and how long it took.

  Attributes:
    operation: ``"save"`` or ``"restore"``.
    step: the step saved or restored.
    bytes: bytes of array data in the state (every array, NumPy value and
      Python scalar of its pytree items; JSON items are not counted).
    blocked_seconds: how long the call (`save` or `restore`) blocked the
      caller.
    seconds: from the start of the call until the step was durable (a save)
      or returned (a restore). None while an async save is still being
      written: it is filled in when the background save finishes.
    async_save: whether the save ran in the background.
  """

  operation: str
  step: Step
  bytes: int
  blocked_seconds: float
  seconds: float | None
  async_save: bool = False

  @property
  def done(self) -> bool:
    """False while an async save is still being written."""
    return self.seconds is not None

  @property
  def mb_per_s(self) -> float | None:
    """Throughput in MB/s (10**6 bytes per second); None while not done."""
    if self.seconds is None:
      return None
    return self.bytes / max(self.seconds, 1e-9) / 1e6

  def describe(self) -> str:
    """One line for a log: ``saved step 10: 536.9 MB in 0.61 s (880 MB/s), caller blocked 0.02 s``."""
    verb = "saved" if self.operation == "save" else "restored"
    where = f"{verb} step {self.step}: {self.bytes / 1e6:.1f} MB"
    if self.seconds is None:
      return f"{where} being written in the background, caller blocked {self.blocked_seconds:.3f} s"
    return f"{where} in {self.seconds:.3f} s ({self.mb_per_s:.0f} MB/s), caller blocked {self.blocked_seconds:.3f} s"
