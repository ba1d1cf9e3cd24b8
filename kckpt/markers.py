"""The end-of-training marker: how a trainer tells its eval jobs it is done.

The trainer calls `write_end_marker(workdir)` after its final save (a
`Checkpointer` that starts saving again removes it: the run is not finished
any more); an eval
job passes ``timeout_fn=lambda: trainer_finished(workdir)`` to
`Checkpointer.iter_new_checkpoints`, which then stops once every step has
been yielded.

>>> import tempfile
>>> workdir = tempfile.mkdtemp()
>>> trainer_finished(workdir)
False
>>> write_end_marker(workdir, step=100)
>>> trainer_finished(workdir)
True
"""

from __future__ import annotations

import json
import time

from kckpt import _fs
from kckpt import _layout
from kckpt._types import PathLike, Step

END_MARKER = "TRAINING_FINISHED.json"


def write_end_marker(workdir: PathLike, *, step: Step | None = None) -> None:
  """Writes ``checkpoints/TRAINING_FINISHED.json`` (call on the primary process)."""
  directory = _layout.checkpoints_dir(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  # Atomic, and overwrites the marker of an earlier run.
  _fs.write_text_atomic(directory / END_MARKER, json.dumps({"final_step": step, "time": time.time()}))


def trainer_finished(workdir: PathLike) -> bool:
  """Whether the trainer of `workdir` wrote its end marker."""
  return (_layout.checkpoints_dir(workdir) / END_MARKER).exists()


def clear_end_marker(workdir: PathLike) -> None:
  """Removes the marker (a resumed trainer is not finished any more)."""
  path = _layout.checkpoints_dir(workdir) / END_MARKER
  if path.exists():
    path.unlink()
