"""segtune.overlay_log: figures drawn and uploaded beside training never fail the trial; their
first failure, from either thread, ends up as a tag on the run. (The figures a whole trial
logs are checked in tests/test_train_tracking.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from segtune.loaders import make_loaders
from segtune.models import build_model
from segtune.overlay_log import ERROR_TAG, OverlayLog
from segtune.prepare import prepare_data
from tracking.runs import TrialRun


def _tracker(cfg, experiment: str, trial_id: str) -> TrialRun:
    return TrialRun.open(cfg.tracking.uri, experiment, sweep_id="none", trial_id=trial_id,
                         parent_run_id=None, params={}, tags={})


def test_figures_upload_in_the_background_and_are_all_up_when_it_closes(tiny_config) -> None:
    cfg = tiny_config
    store, _ = prepare_data(cfg, log=lambda _: None)
    model = build_model(cfg.model).train()
    _, val_dl, test_dl, _ = make_loaders(cfg, store, lambda _: None)
    tracker = _tracker(cfg, cfg.tracking.experiment, "overlay-log")
    with OverlayLog(tracker, 3) as overlays:
        overlays.log(model, val_dl, "overlays/epoch_001")
        assert model.training  # predicting put it in eval mode for a moment only
        overlays.log(model, test_dl)
    client = MlflowClient(cfg.tracking.uri)
    for path in ("overlays/epoch_001", "overlays"):
        pngs = [a.path for a in client.list_artifacts(tracker.run_id, path) if a.path.endswith(".png")]
        assert len(pngs) == 3, (path, pngs)
    assert ERROR_TAG not in client.get_run(tracker.run_id).data.tags


def test_a_figure_that_cannot_be_stored_is_tagged_not_raised(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config
    store, _ = prepare_data(cfg, log=lambda _: None)
    model = build_model(cfg.model)
    _, val_dl, _, _ = make_loaders(cfg, store, lambda _: None)
    # The run's artifacts are to go under a plain file: the upload thread's makedirs fails.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    client = MlflowClient(cfg.tracking.uri)
    name = f"overlay-fail-{tmp_path.name}"
    client.create_experiment(name, artifact_location=blocker.as_uri())
    tracker = _tracker(cfg, name, "blocked")
    with OverlayLog(tracker, 2) as overlays:
        overlays.log(model, val_dl, "overlays/epoch_001")
    error = client.get_run(tracker.run_id).data.tags[ERROR_TAG]
    assert "not-a-folder" in error, error


def test_a_batch_the_model_cannot_score_is_tagged_and_the_model_keeps_its_mode(tiny_config) -> None:
    cfg = tiny_config
    model = build_model(cfg.model).train()
    tracker = _tracker(cfg, cfg.tracking.experiment, "overlay-bad-batch")
    with OverlayLog(tracker, 2) as overlays:
        overlays.log(model, [{"image": torch.zeros(1, 3, 32, 32)}])  # no prompts
    assert model.training
    error = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id).data.tags[ERROR_TAG]
    assert error == "KeyError: 'prompts'"


def test_a_trial_stopped_at_its_report_still_sends_its_figures(tiny_config) -> None:
    # Tune stops a trial by raising SystemExit in its training thread at `report`: leaving the
    # block that way waits for the figures logged before it, as a normal end does.
    cfg = tiny_config
    store, _ = prepare_data(cfg, log=lambda _: None)
    model = build_model(cfg.model)
    _, val_dl, _, _ = make_loaders(cfg, store, lambda _: None)
    tracker = _tracker(cfg, cfg.tracking.experiment, "overlay-stopped")
    with pytest.raises(SystemExit), OverlayLog(tracker, 2) as overlays:
        overlays.log(model, val_dl, "overlays/epoch_005")
        raise SystemExit(0)
    client = MlflowClient(cfg.tracking.uri)
    assert len(client.list_artifacts(tracker.run_id, "overlays/epoch_005")) == 2
