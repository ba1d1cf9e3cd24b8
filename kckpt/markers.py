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
import os
import time

from kckpt import steps as steps_lib
from kckpt._types import PathLike, Step

END_MARKER = "TRAINING_FINISHED.json"


def write_end_marker(workdir: PathLike, *, step: Step | None = None) -> None:
  """Writes ``checkpoints/TRAINING_FINISHED.json`` (call on the primary process)."""
  directory = steps_lib.checkpoints_dir(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".{END_MARKER}.tmp"
  tmp.write_text(json.dumps({"final_step": step, "time": time.time()}))
  final = directory / END_MARKER
  if "://" not in str(final):
    os.replace(tmp, final)  # atomic, and overwrites the marker of an earlier run
  else:
    final.write_text(tmp.read_text())
    tmp.unlink()


def trainer_finished(workdir: PathLike) -> bool:
  """Whether the trainer of `workdir` wrote its end marker."""
  return (steps_lib.checkpoints_dir(workdir) / END_MARKER).exists()


def clear_end_marker(workdir: PathLike) -> None:
  """Removes the marker (a resumed trainer is not finished any more)."""
  path = steps_lib.checkpoints_dir(workdir) / END_MARKER
  if path.exists():
    path.unlink()
