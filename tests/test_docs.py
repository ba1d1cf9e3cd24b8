"""The examples in the docstrings run and say what they show; the documentation site builds with warnings as errors."""

import doctest
import importlib.util
import os
import re
import subprocess

import pytest

import kckpt
from kckpt import _fs
from kckpt import _gc
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
from tests.helpers import PYTHON, REPO

MODULES = [
  kckpt,
  _fs,
  _gc,
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


def test_the_api_reference_shows_doctests_as_code():
  spec = importlib.util.spec_from_file_location("griffe_doctests", REPO / "docs" / "griffe_doctests.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  failures, attempted = doctest.testmod(module)
  assert failures == 0 and attempted > 0


def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
  result = subprocess.run(
    [PYTHON, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
  assert {"index.html", "getting-started/index.html", "guides/notebook/index.html", "reference/checkpointer/index.html"} <= pages
  reference = (tmp_path / "site" / "reference" / "checkpointer" / "index.html").read_text()
  assert "iter_new_checkpoints" in reference  # from the docstrings
  assert re.search(r"class=\"highlight[^\"]*\"><pre><span></span><code>(<span[^>]*>)*&gt;&gt;&gt;", reference)  # examples as code
  notebook = (tmp_path / "site" / "guides" / "notebook" / "index.html").read_text()
  assert all(f"images/{view}.png" in notebook for view in ("run_view", "step_view", "step_view_plain", "diff_view"))
