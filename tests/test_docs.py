"""The examples in the docstrings run and say what they show."""

import doctest

import pytest

import kckpt
from kckpt import _fs
from kckpt import _provenance
from kckpt import _run
from kckpt import _views
from kckpt import base
from kckpt import checkpointer
from kckpt import errors
from kckpt import inspect
from kckpt import items
from kckpt import markers
from kckpt import partial_loader
from kckpt import policies
from kckpt import storage
from kckpt import telemetry
from kckpt import trees
from kckpt import watch
from kckpt._orbax import _checksums, _leafstats, _metadata
from kckpt.cli import _format
from kckpt.inspect import _common
from kckpt.inspect import _diff
from kckpt.inspect import _plot
from kckpt.inspect import _rows
from kckpt.inspect import _treeview
from kckpt.inspect import _verify

MODULES = [
  kckpt,
  _fs,
  _run,
  _views,
  _treeview,
  _metadata,
  base,
  checkpointer,
  inspect,
  _common,
  _diff,
  _plot,
  _rows,
  _provenance,
  errors,
  storage,
  _checksums,
  _leafstats,
  _format,
  _verify,
  items,
  markers,
  partial_loader,
  policies,
  telemetry,
  trees,
  watch,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  failures, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert failures == 0
  if module is not watch:
    assert attempted > 0, f"{module.__name__} has no runnable example"
