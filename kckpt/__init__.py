"""kckpt: a checkpoint manager for JAX/Flax training, built on Orbax.

>>> import kckpt
>>> ckpt = kckpt.Checkpointer(workdir=None, save_interval_steps=1000)
>>> ckpt.max_to_keep
3
"""

from kckpt import items
from kckpt import policies
from kckpt.checkpointer import BaseCheckpointer, Checkpointer, NoopCheckpointer
from kckpt.errors import (
    BackgroundSaveError,
    CheckpointNotFoundError,
    ReadOnlyCheckpointerError,
    StepAlreadyExistsError,
    TreeMismatchError,
)
from kckpt.markers import clear_end_marker, trainer_finished, write_end_marker
from kckpt.storage import StorageOptions, TransferStats

__version__ = "0.1.0"

__all__ = [
    "BackgroundSaveError",
    "BaseCheckpointer",
    "CheckpointNotFoundError",
    "Checkpointer",
    "NoopCheckpointer",
    "ReadOnlyCheckpointerError",
    "StepAlreadyExistsError",
    "StorageOptions",
    "TransferStats",
    "TreeMismatchError",
    "items",
    "policies",
    "clear_end_marker",
    "trainer_finished",
    "write_end_marker",
]
