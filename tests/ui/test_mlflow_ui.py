"""The MLflow UI on a real sweep, in headless Chromium: sweep, trial and member runs unfold; a trial
shows its metrics.

Needs Debian's `chromium` (`.ci/run` installs it) and the `playwright` package (its Python
driver only: the browser is the system one, Playwright's own browser download is not used).
With SEGTUNE_SCREENSHOT set it writes the pictures the README shows: docs/img/mlflow-ui.png (the
runs table) and docs/img/robustness.png (the sweep's finalist heatmap).
"""

from __future__ import annotations

import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import load_config
from tests.conftest import DEMO, REPO
from tracking.urls import runs_url

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


def test_experiment_page_unfolds_sweep_trial_and_members_and_a_trial_page_shows_val_dice(
        browser, tmp_path, em_data, mlflow_server) -> None:
    """One configuration of two members (search.repeats): the runs table shows all three levels."""
    cfg = load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}", "dataset.max_train=8",
        "dataset.max_eval=4", "search.num_samples=1", "search.scheduler=fifo", "search.repeats={seeds: 2}",
        "search.finalists=1", "search.space={train.epochs: {choice: [2]}, train.lr: {loguniform: [1.0e-3, 3.0e-3]}}",
        f"search.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_server.uri}", "tracking.experiment=ui",
    ])
    outcome = run_sweep(cfg, log=lambda _: None)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("ui")
    parent = client.get_run(outcome.parent_run_id)
    (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'trial'")
    members = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'member'")
    assert len(members) == 2

    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.goto(runs_url(mlflow_server.uri, exp.experiment_id), wait_until="domcontentloaded")
    # Nested runs sit collapsed under their parent: each row's expander button shows its children.
    for run in (parent, trial):
        page.get_by_text(run.info.run_name).first.wait_for(timeout=30_000)
        row = page.locator("[role=row]", has_text=run.info.run_name).first
        row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    for member in members:
        page.get_by_text(member.info.run_name).first.wait_for(timeout=30_000)
    if os.environ.get("SEGTUNE_SCREENSHOT"):  # the pictures the README shows
        page.screenshot(path=str(REPO / "docs" / "img" / "mlflow-ui.png"))
        heatmap = client.download_artifacts(parent.info.run_id, "robustness/robustness.png", str(tmp_path))
        shutil.copy(heatmap, REPO / "docs" / "img" / "robustness.png")

    page.goto(f"{mlflow_server.uri}/#/experiments/{exp.experiment_id}/runs/{trial.info.run_id}",
              wait_until="domcontentloaded")
    page.get_by_text("val/dice_lcb").first.wait_for(timeout=30_000)
    page.close()
