"""What the commands share: exit statuses, the RUN argument, step names, retention flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from kckpt import _fs
from kckpt import _layout
from kckpt import _orbax
from kckpt import _run
from kckpt import inspect
from kckpt import policies
from kckpt._types import EPath, Step, StepSpec
from kckpt.errors import CheckpointNotFoundError, CliError

PROG = "kckpt"
EXIT_OK, EXIT_FOUND, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
RUN_HELP = "a workdir, its checkpoints/ folder, or one ckpt_<step> folder"
STEP_HELP = (
  "a number, -1 or 'latest' (the newest), 'best' (by the retention rules), 'last_good' (the newest healthy step),"
  " or a tag given to save"
)


# ---------------------------------------------------------------------------
# Where the checkpoints are: the RUN argument
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunLocation:
  """What a RUN argument names.

  Attributes:
    checkpoints: the folder holding the ``ckpt_<step>`` folders.
    step: the step when RUN was one step folder, else None.
    given: RUN as typed.
  """

  checkpoints: EPath
  step: Step | None
  given: str

  def listing(self) -> _run.StepListing:
    return _run.list_steps(self.checkpoints)

  def step_path(self, step: Step) -> EPath:
    return _layout.step_dir(self.checkpoints, step)


def locate(given: str) -> RunLocation:
  """Finds the checkpoints folder (and step) that `given` names (made absolute: Orbax reads only those); CliError if none."""
  path = _fs.as_path(_fs.absolute(given))
  try:
    exists, is_dir = path.exists(), path.is_dir()
  except OSError as e:
    raise CliError(f"cannot read {given}: {inspect.short_error(e)}") from None
  if not exists:
    raise CliError(f"no such folder: {given}")
  if not is_dir:
    raise CliError(f"not a folder: {given} (give a workdir, its checkpoints/ folder or a ckpt_<step> folder)")
  if _orbax.is_step_folder(path):
    return RunLocation(checkpoints=path.parent, step=_layout.parse_step(path.name), given=given)
  if (path / _layout.CHECKPOINTS_FOLDER).is_dir():
    return RunLocation(checkpoints=path / _layout.CHECKPOINTS_FOLDER, step=None, given=given)
  if path.name == _layout.CHECKPOINTS_FOLDER or any(_layout.is_step_like(child.name) for child in path.iterdir()):
    return RunLocation(checkpoints=path, step=None, given=given)
  raise CliError(
    f"{given} is not a kckpt run: it has no {_layout.CHECKPOINTS_FOLDER}/ folder and no {_layout.STEP_PREFIX}_<step> folders"
  )


def locate_run(given: str, command: str) -> RunLocation:
  """Like `locate`, for commands that act on a whole run (not one step folder)."""
  location = locate(given)
  if location.step is not None:
    raise CliError(f"{command} works on a whole run, and {given} is one step folder; give its run: {location.checkpoints}")
  return location


# ---------------------------------------------------------------------------
# Step names: --step and RUN@STEP
# ---------------------------------------------------------------------------


def parse_step_arg(text: str) -> StepSpec:
  """A step name as `restore(step=...)` takes it: ``"10" -> 10``, ``"-1"``, ``"latest"``, ``"best"``, a tag."""
  step = _run.parse_step_name(text)
  if isinstance(step, int) and step < -1:
    raise argparse.ArgumentTypeError(f"a step is a number >= 0, -1, 'latest', 'best' or a tag; got {text!r}")
  if step == "":
    raise argparse.ArgumentTypeError("a step name is empty")
  return step


# RUN@STEP: the last '@' (a path may hold one), and a step name without '/' after it.
_RUN_AT_STEP = re.compile(r"^(?P<run>.*)@(?P<step>[^@/]+)$")


def split_run_at_step(text: str, other: str = "") -> tuple[str, StepSpec | None]:
  """``"run@10" -> ("run", 10)``, ``"run@best"``, ``"run@my-tag"``; ``"@20"`` is step 20 of `other`'s run.

  A plain path has no step (None). A path that exists as typed (a folder
  named ``run@v2``) stays a path unless the part before '@' is a folder too.
  """
  match = _RUN_AT_STEP.match(text)
  if not match or (match.group("run") and _is_folder(text) and not _is_folder(match.group("run"))):
    return text, None
  run, step_text = match.group("run"), match.group("step")
  try:
    step = parse_step_arg(step_text)
  except argparse.ArgumentTypeError as e:
    raise CliError(f"{text}: {e}") from None
  if not run:
    run = split_run_at_step(other)[0] if other and not other.startswith("@") else ""
    if not run:
      raise CliError(f"{text!r} and {other!r}: give a run, e.g. kckpt diff /tmp/run@10 @20")
  return run, step


def _is_folder(text: str) -> bool:
  try:
    return _fs.as_path(text).is_dir()
  except OSError:
    return False


def resolve_step(location: RunLocation, step: StepSpec | None, args: argparse.Namespace | None = None) -> Step:
  """The step that `step` names in `location` (None: the newest, or RUN's own step); CliError if none.

  ``"best"`` ranks steps by the retention rules (`retention_policy`: the flags,
  else the rules the run's writer recorded, else kckpt's defaults).
  """
  retention = retention_policy(args, location) if step == "best" else None
  index = _run.RunIndex(location.checkpoints, retention=retention)
  if location.step is not None:
    if step is not None and step not in ("latest", -1, location.step):
      named = _require(index, step, location)
      if named != location.step:
        also = "" if isinstance(step, int) else f" (step {named})"
        raise CliError(f"{location.given} is step {location.step}, but --step {step}{also} was asked for")
    if not location.step_path(location.step).exists():
      raise CliError(f"step {location.step} is not in {location.checkpoints} any more")
    return location.step
  return _require(index, "latest" if step is None else step, location)


def _require(index: _run.RunIndex, step: StepSpec, location: RunLocation) -> Step:
  try:
    return index.require(step)
  except CheckpointNotFoundError:
    finished = index.finished()
    if not finished:
      raise CliError(f"no finished step in {location.checkpoints}") from None
    steps = _layout.steps_repr(finished)
    if isinstance(step, int):
      raise CliError(f"step {step} is not in {location.checkpoints} (steps: {steps})") from None
    if step == "best":
      raise CliError(
        f"no step of {location.checkpoints} has a score for the best metric {index.retention.best_metric_path!r} (steps: {steps})"
      ) from None
    raise CliError(f"no step of {location.checkpoints} has the tag {step!r} (steps: {steps}); a step is {STEP_HELP}") from None
  except ValueError as e:
    raise CliError(f"{step!r}: {e}") from None


def steps_to_visit(location: RunLocation, step: StepSpec | None, args: argparse.Namespace | None = None) -> list[Step]:
  """One step when asked for (or when RUN is a step folder), else every finished step."""
  if step is not None or location.step is not None:
    return [resolve_step(location, step, args)]
  finished = list(location.listing().finished)
  if not finished:
    raise CliError(f"no finished step in {location.checkpoints}")
  return finished


def step_items(step_path: EPath) -> dict[str, str]:
  """`inspect.user_items`, with a CliError when the step folder went away."""
  try:
    return inspect.user_items(step_path)
  except (FileNotFoundError, NotADirectoryError):
    raise CliError(f"step folder {step_path} disappeared (deleted by the run's retention?)") from None


# ---------------------------------------------------------------------------
# Retention flags (gc and ls)
# ---------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
KEEP_ALL = "all"
_RETENTION_FLAGS = ("max_to_keep", "keep_period", "keep_time_interval", "best_metric", "best_mode")


def parse_duration(text: str) -> float:
  """``"90" -> 90.0``, ``"30m" -> 1800.0``, ``"2h"``, ``"1d"``."""
  match = _DURATION.match(text.strip())
  if not match or float(match.group(1)) <= 0:
    raise argparse.ArgumentTypeError(f"a duration is a positive number of seconds or like 30m, 2h, 1d; got {text!r}")
  return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_max_to_keep(text: str) -> int | str:
  """A positive number, or ``"all"`` (keep every step)."""
  if text == KEEP_ALL:
    return KEEP_ALL
  return _positive_int(text, f"--max-to-keep is a positive number or 'all', got {text!r}")


def parse_positive_int(text: str) -> int:
  return _positive_int(text, f"expected a positive number, got {text!r}")


def _positive_int(text: str, error: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(error)
  return value


def add_retention_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
    "retention rules",
    "the Checkpointer fields of the same names; without them, the rules the run's writer recorded"
    " (checkpoints/RETENTION.json), else kckpt's defaults",
  )
  group.add_argument(
    "--max-to-keep",
    type=parse_max_to_keep,
    metavar="N|all",
    help=f"keep the newest N steps (default {policies.DEFAULT_MAX_TO_KEEP}), or with --best-metric the best N",
  )
  group.add_argument("--keep-period", type=parse_positive_int, metavar="N", help="also keep every step divisible by N")
  group.add_argument(
    "--keep-time-interval",
    type=parse_duration,
    metavar="DURATION",
    help="also keep one step per interval (seconds, or 30m, 2h, 1d)",
  )
  group.add_argument("--best-metric", metavar="PATH", help="dotted path into the saved metrics (eval.loss) that ranks steps")
  group.add_argument(
    "--best-mode",
    choices=policies.BEST_MODES,
    default=None,
    help="whether the best metric is highest (max, default) or lowest (min)",
  )


def retention_flags_given(args: argparse.Namespace | None) -> bool:
  return args is not None and any(getattr(args, n, None) is not None for n in _RETENTION_FLAGS)


def retention_policy(args: argparse.Namespace | None, location: RunLocation | None = None) -> policies.RetentionPolicy:
  """The rules from the flags; else those the run's writer recorded; else kckpt's defaults."""
  flags: dict[str, Any] = {n: getattr(args, n, None) for n in _RETENTION_FLAGS}
  if flags["best_mode"] is not None and flags["best_metric"] is None:
    raise CliError("--best-mode needs --best-metric")
  if not retention_flags_given(args) and location is not None:
    rules = _layout.read_retention_rules(location.checkpoints)
    if rules is not None:
      try:
        return policies.policy_from_rules(rules)
      except ValueError as e:
        raise CliError(f"{location.checkpoints}: {e}; pass the retention rules as flags") from None
  max_to_keep = flags["max_to_keep"]
  return policies.RetentionPolicy(
    max_to_keep=policies.DEFAULT_MAX_TO_KEEP if max_to_keep is None else (None if max_to_keep == KEEP_ALL else max_to_keep),
    keep_period=flags["keep_period"],
    keep_time_interval_secs=flags["keep_time_interval"],
    best_metric_path=flags["best_metric"],
    best_mode=flags["best_mode"] or "max",
  )


def policy_source(args: argparse.Namespace, location: RunLocation) -> str:
  if retention_flags_given(args):
    return "from flags"
  if _layout.read_retention_rules(location.checkpoints) is not None:
    return f"recorded by the run's writer in {_layout.RETENTION_FILE}"
  return "kckpt's defaults; pass the run's rules as flags"
