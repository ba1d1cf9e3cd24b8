"""kckpt: a checkpoint manager for JAX/Flax training, built on Orbax.

>>> import kckpt
>>> ckpt = kckpt.Checkpointer(workdir=None, save_interval_steps=1000)
>>> ckpt.max_to_keep
3
"""

from kckpt import items
from kckpt import policies
from kckpt import trees
from kckpt.checkpointer import BaseCheckpointer, Checkpointer, NoopCheckpointer
from kckpt.errors import (
    BackgroundSaveError,
    CheckpointNotFoundError,
    CheckpointReadError,
    ConcurrentWriterError,
    ProcessTimeoutError,
    ReadOnlyCheckpointerError,
    StepAlreadyExistsError,
    TreeMismatchError,
)
from kckpt.transplant import PartialLoader, TransplantError
from kckpt.markers import clear_end_marker, trainer_finished, write_end_marker
from kckpt.storage import StorageOptions, TransferStats

__version__ = "0.1.0"

__all__ = [
    "BackgroundSaveError",
    "BaseCheckpointer",
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "ConcurrentWriterError",
    "Checkpointer",
    "NoopCheckpointer",
    "PartialLoader",
    "ProcessTimeoutError",
    "ReadOnlyCheckpointerError",
    "StepAlreadyExistsError",
    "TransplantError",
    "StorageOptions",
    "TransferStats",
    "TreeMismatchError",
    "items",
    "policies",
    "trees",
    "clear_end_marker",
    "trainer_finished",
    "write_end_marker",
]
