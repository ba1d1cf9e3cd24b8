"""The notebook views (run, step, diff): their HTML, what they read, and how a real browser renders them.

The browser tests load the views into headless Chromium (the OS's chromium and chromium-driver,
driven by Selenium) and check the rendered DOM: rows, the best marker, the plots' SVG, the
tree's nodes (treescope's too, inside its shadow DOM). Each keeps a screenshot under
build/test-artifacts/. Where Chromium is not installed they are skipped, unless
KCKPT_REQUIRE_BROWSER=1 (as .ci/run sets it, after installing Chromium) makes that a failure.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kckpt
from kckpt import _views
from kckpt._orbax import _format
from tests.helpers import REPO, HtmlTable

LOSSES = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.7, 5: 0.6}


def state(step: int, bad: bool = False) -> dict:
  w = jnp.full((4, 8), float(step), jnp.float32)
  return {"params": {"dense": {"w": w * np.nan if bad else w, "b": jnp.arange(8.0)}}, "step": step}


@pytest.fixture
def run(workdir):
  """Steps 1-5 ranked by eval.loss (min; step 2 best), max_to_keep=2; step 4 tagged; step 5 holds NaN."""
  with kckpt.Checkpointer(
    workdir=workdir, save_interval_steps=1, max_to_keep=2, best_metric_path="eval.loss", best_mode="min", async_save=False
  ) as ckpt:
    for step, loss in LOSSES.items():
      ckpt.save(
        state(step, bad=step == 5), step=step, metrics={"eval": {"loss": loss}, "lr": 0.1}, tag="warm" if step == 4 else None
      )
  return workdir


def test_run_view_marks_the_best_step_and_shows_sizes_tags_health_and_why_each_stays(run):
  reader = kckpt.Checkpointer.open(run)
  page = reader._repr_html_()
  table = HtmlTable(page, "kckpt-steps")
  assert table.header == ["step", "saved", "size", "items", "eval.loss ★ min", "lr", "tag", "health", "kept by"]
  assert table.column("step") == ["5", "4", "3", "2"]  # newest first; step 1 was deleted
  assert table.column("eval.loss") == ["0.6", "0.7", "0.5", "★ 0.3"]  # the best step's value marked
  assert [attrs.get("class") for attrs, _ in table.rows] == [None, None, None, "kckpt-best-row"]
  assert table.column("tag") == ["", "warm", "", ""]
  health = table.column("health")
  assert health[0].startswith("unhealthy: nan/inf") and health[1:] == ["ok"] * 3
  # The writer's recorded rules judge each step: the newest, the best two, and the last healthy step.
  assert table.column("kept by") == ["newest", "last good", "best #2", "best #1"]
  assert all(size.endswith("KiB") for size in table.column("size"))
  assert "4 steps (2..5)" in page and "best step 2 by eval.loss (min)" in page
  assert page.count("<svg") == 2 and page.count("<polyline") == 2  # eval.loss and lr over the run
  assert "(best)" in reader.summary() and "UNHEALTHY" in reader.summary()


def test_a_reader_judges_steps_by_the_rules_its_writer_recorded_unless_given_others(run):
  reader = kckpt.Checkpointer.open(run)
  assert (reader.best_metric_path, reader.best_mode, reader.max_to_keep) == ("eval.loss", "min", 2)
  assert reader.best_step == 2 and reader.step_details("best").step == 2
  assert [d.reasons for d in reader.retention()] == [("best #1",), ("best #2",), ("last good",), ("newest",)]
  assert "(as the run's writer recorded them)" in html.unescape(reader._repr_html_())
  mine = kckpt.Checkpointer.open(run, max_to_keep=10)  # explicit rules: these, and kckpt's defaults for the rest
  assert mine.best_metric_path is None
  assert "(this Checkpointer's; the run's writer recorded others)" in html.unescape(mine._repr_html_())


def test_the_best_step_shows_below_the_newest_rows_when_it_is_older(run):
  reader = kckpt.Checkpointer.open(run)
  summary = _views.run_summary(reader._index, max_rows=2)
  assert [r.step for r in summary.rows] == [5, 4] and summary.best_row.step == 2
  table = HtmlTable(summary.as_html(), "kckpt-steps")
  assert [cells[0] for _, cells in table.rows] == ["5", "4", "⋮", "2"]
  assert table.rows[-1][0]["class"] == "kckpt-best-row" and table.rows[-1][1][4] == "★ 0.3"
  assert "best: step 2" in summary.as_text()


def test_an_empty_run_and_an_unbound_checkpointer_show_as_such(tmp_path):
  page = kckpt.Checkpointer.open(tmp_path / "empty")._repr_html_()
  assert "0 steps" in page and "no finished step yet" in page
  unbound = kckpt.Checkpointer(workdir=None, save_interval_steps=10)
  assert "no workdir bound yet" in unbound.summary() and "Checkpointer(" in unbound._repr_html_()


def test_run_view_of_a_long_run_reads_the_newest_rows_and_a_spread_of_steps(tmp_path, monkeypatch):
  workdir = tmp_path / "long"
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, max_to_keep=None, async_save=False) as ckpt:
    for step in range(10):
      ckpt.save({"w": np.full(4, step, np.float32)}, step=step, metrics={"loss": 1.0 / (step + 1)})
  checkpoints = workdir / "checkpoints"
  for step in range(10, 1000):  # hard-linked copies: a 1000-step run in a second
    subprocess.run(["cp", "-al", str(checkpoints / f"ckpt_{step % 10}"), str(checkpoints / f"ckpt_{step}")], check=True)
  read_steps: set[str] = set()
  real_read = _format._read_json

  def recording_read(folder, *names):
    read_steps.add(os.path.basename(os.fspath(folder)))
    return real_read(folder, *names)

  monkeypatch.setattr(_format, "_read_json", recording_read)
  reader = kckpt.Checkpointer.open(workdir)
  summary = _views.run_summary(reader._index, max_rows=10)
  assert [r.step for r in summary.rows] == list(range(999, 989, -1))
  assert len(read_steps) <= 10 + _views.PLOT_POINTS  # not the 1000 steps
  points = summary.history["loss"]
  assert len(points) == _views.PLOT_POINTS and points[0][0] == 0 and points[-1][0] == 999
  page = summary.as_html()
  assert "990 older step(s) not shown" in page and len(HtmlTable(page, "kckpt-steps").rows) == 10
  # Ranked by a metric: the rules need every step's metrics, read once (one small file a step), then cached.
  ranked = kckpt.Checkpointer.open(workdir, best_metric_path="loss", best_mode="max", max_to_keep=2)
  read_files = []
  monkeypatch.setattr(_format, "_read_json", lambda folder, *names: read_files.append(names) or real_read(folder, *names))
  ranked._repr_html_()
  first = len(read_files)
  assert read_files.count(("_CHECKPOINT_METADATA",)) <= 1000 + 10 + 1 + _views.PLOT_POINTS
  ranked._repr_html_()
  assert len(read_files) - first <= 2 * 10 + 1 + _views.PLOT_POINTS  # the records are not read again


def test_step_view_shows_each_leaf_with_spec_sharding_and_statistics(workdir):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  sharded = jax.device_put(jnp.arange(32.0).reshape(8, 4), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    params = {"w": sharded, "b": jnp.ones(4), "vocab": {"en": jnp.zeros(2)}}
    ckpt.save(kckpt.items.Composite(params=params, meta=kckpt.items.Json({"lr": 0.1})), step=3)
  view = kckpt.Checkpointer.open(workdir).tree(3)
  assert list(view.items) == ["params"] and view.json_items == {"meta": {"lr": 0.1}}
  w = view.items["params"]["w"]
  assert (w.shape, w.dtype, w.bytes) == ((8, 4), "float32", 128)
  assert w.sharding == "mesh(data=4) P('data')"
  assert w.stats["norm"] == pytest.approx(float(np.linalg.norm(np.arange(32.0))))
  assert (w.stats["min"], w.stats["max"], w.stats["nonfinite"]) == (0.0, 31.0, 0)
  text = str(view)
  assert "  w: (8, 4) float32, 128 B, mesh(data=4) P('data')  [norm 102.1, min 0, max 31, mean 15.5]" in text
  assert text.startswith("step 3: 3 leaves, 152 B\nparams:\n") and text.endswith("meta: (JSON)")
  assert view.nested()["params"]["vocab"]["en"].shape == (2,)
  plain = view.plain_html()
  assert plain.count('class="kckpt-leaf"') == 3 and 'data-path="w"' in plain and "norm 102.1" in plain
  assert '<details class="kckpt-node"><summary><code>vocab</code>' not in plain  # the first level opens
  assert "treescope" in view._repr_html_()  # treescope is installed with the test extra


def test_a_large_tree_shows_as_plain_html(workdir, monkeypatch):
  from kckpt.inspect import _treeview  # pylint: disable=import-outside-toplevel

  with kckpt.Checkpointer(workdir=workdir, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({f"layer_{i}": np.ones(2, np.float32) for i in range(5)}, step=1)
  view = kckpt.Checkpointer.open(workdir).tree(1)
  monkeypatch.setattr(_treeview, "TREESCOPE_MAX_LEAVES", 4)  # treescope takes a minute for 10,000 leaves
  page = view._repr_html_()
  assert 'class="kckpt-tree"' in page and "treescope" not in page


def test_diff_is_a_library_call_that_displays_as_a_table(run):
  reader = kckpt.Checkpointer.open(run)
  diff = reader.diff(2, 5)  # step 5's w is all NaN, and the saved step number differs
  assert not diff.equal and diff.summary() == "2 changed, 0 only in A, 0 only in B, 1 identical"
  assert [d.leaf for d in diff.changed] == ["params.dense.w", "step"]
  assert math.isnan(diff.changed[0].max_abs_diff) and diff.changed[1].max_abs_diff == 3
  table = HtmlTable(diff._repr_html_(), "kckpt-diff")
  assert table.header[:4] == ["leaf", "change", "A", "B"]
  assert [cells[:5] for _, cells in table.rows] == [  # the largest relative change first (NaN: the largest)
    ["params.dense.w", "changed", "(4, 8) float32", "(4, 8) float32", "nan"],
    ["step", "changed", "scalar int64", "scalar int64", "3"],
  ]
  # Against another run: a leaf only on one side.
  other = run.parent / "other"
  with kckpt.Checkpointer(workdir=other, save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save({"params": {"dense": {"w": jnp.full((4, 8), 2.0)}}, "step": 2}, step=1)
  diff = reader.diff(2, 1, other=other)
  assert diff.only_in_a == [("params.dense.b", "(8,) float32")] and not diff.changed
  assert diff.b.endswith("other/checkpoints/ckpt_1")


# -- In a real browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = REPO / "build" / "test-artifacts"


REQUIRED = os.environ.get("KCKPT_REQUIRE_BROWSER") == "1"  # .ci/run: installs Chromium, then the browser tests must run


@pytest.fixture
def browser():
  if not (CHROMIUM and CHROMEDRIVER):
    pytest.fail("KCKPT_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed")
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix="kckpt-chromium-")
  # Headless, and nothing that reaches for the network (refused here, and slow to fail).
  for flag in (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1600",
    f"--user-data-dir={profile}",
  ):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def show(driver, html: str, name: str, tmp_path: Path) -> None:
  """Loads `html` as a page and keeps a screenshot of it as a test artifact."""
  page = tmp_path / f"{name}.html"
  page.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{html}</body></html>")
  driver.get(page.as_uri())
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


@pytest.mark.skipif(
  not (CHROMIUM and CHROMEDRIVER) and not REQUIRED,
  reason="headless Chromium is not installed here (apt-get install chromium chromium-driver); .ci/run installs it",
)
def test_views_render_in_a_real_browser(run, browser, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel

  reader = kckpt.Checkpointer.open(run)
  show(browser, reader._repr_html_(), "run_view", tmp_path)
  rows = browser.find_elements(By.CSS_SELECTOR, "table.kckpt-steps tbody tr")
  assert [r.get_attribute("data-step") for r in rows] == ["5", "4", "3", "2"]
  best = browser.find_element(By.CSS_SELECTOR, "tr.kckpt-best-row")
  assert best.get_attribute("data-step") == "2" and best.find_element(By.CSS_SELECTOR, ".kckpt-best").text == "★"
  assert len(browser.find_elements(By.CSS_SELECTOR, ".kckpt-plots svg polyline")) == 2
  assert browser.find_element(By.CSS_SELECTOR, ".kckpt-plots svg").size["width"] > 100  # laid out, not collapsed

  view = reader.tree(2)
  show(browser, view.plain_html(), "step_view_plain", tmp_path)
  leaves = browser.find_elements(By.CSS_SELECTOR, "li.kckpt-leaf")
  assert sorted(leaf.get_attribute("data-path") for leaf in leaves) == ["params.dense.b", "params.dense.w", "step"]
  w = browser.find_element(By.CSS_SELECTOR, 'li[data-path="params.dense.w"]')
  assert "norm" in w.get_attribute("textContent") and not w.is_displayed()  # below the first level: collapsed

  show(browser, view.treescope_html(), "step_view_treescope", tmp_path)
  # treescope draws the tree with its own script, inside a shadow root.
  text = browser.execute_script(
    "return Array.from(document.querySelectorAll('treescope-container')).map(c => (c.shadowRoot || c).textContent).join(' ')"
  )
  assert "LeafInfo" in text and "'dense'" in text and "'float32'" in text

  show(browser, reader.diff(2, 5)._repr_html_(), "diff_view", tmp_path)
  changed = browser.find_elements(By.CSS_SELECTOR, "table.kckpt-diff tr.kckpt-changed td")
  assert [c.text for c in changed[:2]] == ["params.dense.w", "changed"]
