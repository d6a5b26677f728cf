"""The MLflow UI on a real sweep, in headless Chromium: the parent lists its trials, a trial shows val/dice.

Needs Debian's `chromium` (`.ci/run` installs it) and the `playwright` package (its Python
driver only: the browser is the system one, Playwright's own browser download is not used).
Writes the screenshot the README shows to docs/img/mlflow-ui.png when SEGTUNE_SCREENSHOT is set.
"""

from __future__ import annotations

import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import load_config
from tests.conftest import DEMO, REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags the machine's notes give for headless Chromium as root on a closed network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_experiment_page_lists_the_sweep_and_a_trial_page_shows_val_dice(browser, tmp_path, em_data,
                                                                         mlflow_server) -> None:
    cfg = load_config(DEMO, ["search.finalists=0",
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}", "dataset.max_train=8",
        "dataset.max_eval=4", "search.num_samples=2", "search.scheduler=fifo",
        "search.space={train.epochs: {choice: [2]}, train.lr: {loguniform: [1.0e-3, 3.0e-3]}}",
        f"search.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_server.uri}", "tracking.experiment=ui",
    ])
    outcome = run_sweep(cfg, log=lambda _: None)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("ui")
    parent = client.get_run(outcome.parent_run_id)
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'trial'")
    assert len(trials) == 2

    page = browser.new_page(viewport={"width": 1600, "height": 900})
    # MLflow 3 opens an experiment on its GenAI overview; the runs table is the "Training runs" tab.
    page.goto(f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs", wait_until="domcontentloaded")
    page.get_by_text(parent.info.run_name).first.wait_for(timeout=30_000)
    # Nested trials sit collapsed under their parent: its row's expander button shows them.
    row = page.locator("[role=row]", has_text=parent.info.run_name).first
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    for trial in trials:
        page.get_by_text(trial.info.run_name).first.wait_for(timeout=30_000)
    if os.environ.get("SEGTUNE_SCREENSHOT"):
        page.screenshot(path=str(REPO / "docs" / "img" / "mlflow-ui.png"))

    page.goto(f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs/{trials[0].info.run_id}",
              wait_until="domcontentloaded")
    page.get_by_text("val/dice").first.wait_for(timeout=30_000)
    page.close()
