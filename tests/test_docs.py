"""The examples in the docstrings run and say what they show."""

import doctest

import pytest

import kckpt
from kckpt import _run, base, checkpointer, inspect, items, markers, partial_loader, policies, telemetry, trees, watch
from kckpt.inspect import _common, _diff, _rows, _verify

MODULES = [kckpt, _run, base, checkpointer, inspect, _common, _diff, _rows, _verify, items, markers, partial_loader, policies, telemetry, trees, watch]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert failures == 0
  if module is not watch:
    assert attempted > 0, f"{module.__name__} has no runnable example"
