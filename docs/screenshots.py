"""Makes the screenshots of the notebook views in docs/images/ (run view, step view, diff view).

A small run (steps 1-5 ranked by eval.loss, one tagged, the newest holding NaN) is saved in a
temporary folder, each view is rendered by headless Chromium (the OS's chromium and
chromium-driver, as in tests/test_views.py) and a PNG of the page is written.

    python docs/screenshots.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

import kckpt

IMAGES = Path(__file__).resolve().parent / "images"
FLAGS = (
  "--headless=new",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
)


def demo_run(root: Path) -> Path:
  workdir = root / "my_run"
  rng = np.random.default_rng(0)
  losses = [0.92, 0.41, 0.47, 0.55, 0.52]
  with kckpt.Checkpointer(
    workdir=workdir, save_interval_steps=1000, max_to_keep=2, best_metric_path="eval.loss", best_mode="min", async_save=False
  ) as ckpt:
    for i, loss in enumerate(losses):
      step = 1000 * (i + 1)
      w = jnp.asarray(rng.standard_normal((64, 32), np.float32) * 0.1 * (i + 1))
      params = {"dense": {"w": w * np.nan if i == 4 else w, "b": jnp.zeros(32)}, "embed": jnp.ones((100, 16)) * i}
      ckpt.save(
        kckpt.items.Composite(params=params, meta=kckpt.items.Json({"lr": 1e-3})),
        step=step,
        metrics={"eval": {"loss": loss, "acc": 1 - loss / 2}, "train": {"loss": loss * 0.9}},
        tag="before-lr-drop" if step == 3000 else None,
      )
  return workdir


def main() -> None:
  root = Path(tempfile.mkdtemp(prefix="kckpt-docs-"))
  profile = tempfile.mkdtemp(prefix="kckpt-chromium-")
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium") or "chromium"
  for flag in (*FLAGS, "--window-size=1000,520", f"--user-data-dir={profile}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
  try:
    reader = kckpt.Checkpointer.open(demo_run(root))
    views = {
      "run_view": reader._repr_html_(),
      "step_view": reader.tree(2000).treescope_html(),
      "step_view_plain": reader.tree(2000).plain_html(),
      "diff_view": reader.diff(2000, 5000)._repr_html_(),
    }
    IMAGES.mkdir(exist_ok=True)
    for name, html in views.items():
      page = root / f"{name}.html"
      page.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{html}</body></html>")
      driver.get(page.as_uri())
      driver.save_screenshot(str(IMAGES / f"{name}.png"))
      print(IMAGES / f"{name}.png")
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
