"""run_trial end to end without Ray, against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.config import flatten
from segtune.prepare import prepare_data
from segtune.train import TrialContext, run_trial
from tracking.artifacts import verify_manifest
from tracking.errors import TrackingError
from tracking.runs import TrialRun


def test_run_trial_logs_metrics_checkpoint_and_manifest(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config
    store, data_hash = prepare_data(cfg, log=lambda _: None)
    tracker = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="none", trial_id="t1",
                            parent_run_id=None, params=flatten(cfg),
                            tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
                                  "segtune.data_hash": data_hash})
    out = run_trial(cfg, TrialContext(store=store, workdir=tmp_path / "trial", tracker=tracker, log=lambda _: None))

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/dice_loss", "val/dice", "val/iou"):
        steps = [m.step for m in client.get_metric_history(tracker.run_id, key)]
        assert sorted(steps) == [1, 2], key
    assert run.data.metrics["test/iou"] == pytest.approx(out["test/iou"])
    assert 0.0 <= run.data.metrics["test/iou"] <= 1.0
    assert run.data.metrics["val/dice_best"] == max(
        m.value for m in client.get_metric_history(tracker.run_id, "val/dice"))
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.tags["segtune.data_hash"] == data_hash

    names = {Path(a.path).name for a in client.list_artifacts(tracker.run_id, "checkpoints/best")}
    assert {"model.safetensors", "state.json", "optimizer.safetensors", "manifest.json"} <= names
    local = Path(client.download_artifacts(tracker.run_id, "checkpoints/best", str(tmp_path / "dl")))
    assert len(verify_manifest(local)) == 64
    state = json.loads((local / "state.json").read_text())
    assert state["config"]["train"]["lr"] == cfg.train.lr  # the config used travels with the weights

    # The manifest catches a changed file.
    with open(local / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TrackingError, match="model.safetensors"):
        verify_manifest(local)


def test_reopening_a_trial_reattaches_to_its_run(tiny_config) -> None:
    cfg = tiny_config
    first = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="s1", trial_id="same",
                          parent_run_id=None, params={"a": 1}, tags={})
    first.finish("FAILED")
    again = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="s1", trial_id="same",
                          parent_run_id=None, params={"a": 1}, tags={})
    assert again.run_id == first.run_id
    assert MlflowClient(cfg.tracking.uri).get_run(again.run_id).info.status == "RUNNING"
    again.finish()


def test_trials_log_overlays_during_training_and_at_the_end(tiny_config, tmp_path: Path) -> None:
    from segtune.config import apply_params

    cfg = apply_params(tiny_config, {"eval.overlay_every": 1, "eval.overlays": 2})
    store, _ = prepare_data(cfg, log=lambda _: None)
    tracker = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="none", trial_id="overlays",
                            parent_run_id=None, params=flatten(cfg), tags={})
    run_trial(cfg, TrialContext(store=store, workdir=tmp_path / "trial", tracker=tracker, log=lambda _: None))
    client = MlflowClient(cfg.tracking.uri)
    during = [a.path for a in client.list_artifacts(tracker.run_id, "overlays/epoch_001")]
    final = [a.path for a in client.list_artifacts(tracker.run_id, "overlays") if a.path.endswith(".png")]
    assert len([p for p in during if p.endswith(".png")]) == 2 and len(final) == 2


def test_an_untracked_trial_logs_to_the_null_tracker(tiny_config, tmp_path: Path) -> None:
    """`segtune train --no-track`: no run anywhere, the same loop, checkpoints and scores."""
    from segtune.config import apply_params
    from segtune.train import NullTracker

    cfg = apply_params(tiny_config, {"eval.overlay_every": 1})  # figures asked for: nothing to send them to
    store, _ = prepare_data(cfg, log=lambda _: None)
    ctx = TrialContext(store=store, workdir=tmp_path / "trial", log=lambda _: None)
    assert isinstance(ctx.tracker, NullTracker) and ctx.tracker.offline
    out = run_trial(cfg, ctx)
    assert 0.0 <= out["test/iou"] <= 1.0 and out["best_epoch"] in (1, 2)
    assert (tmp_path / "trial" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert MlflowClient(cfg.tracking.uri).get_experiment_by_name(cfg.tracking.experiment) is None


def test_null_tracker_and_trial_run_both_speak_the_tracker_protocol(tiny_config) -> None:
    import typing

    from segtune.train import NullTracker, Tracker

    members = {n for n in vars(Tracker) if not n.startswith("_")} | set(typing.get_type_hints(Tracker))
    assert {"log_metrics", "flush", "log_checkpoint", "upload", "set_tags", "fail", "finish", "offline"} <= members
    cfg = tiny_config
    run = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="s", trial_id="protocol",
                        parent_run_id=None, params={}, tags={})
    for tracker in (NullTracker(), run):
        assert [m for m in sorted(members) if not hasattr(tracker, m)] == [], type(tracker).__name__
    run.finish()


def test_tracked_ends_a_failing_run_with_its_reason_and_lets_stops_through(tiny_config) -> None:
    from segtune.trial import tracked

    cfg = tiny_config
    client = MlflowClient(cfg.tracking.uri)
    run = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="s", trial_id="fails",
                        parent_run_id=None, params={}, tags={})
    with pytest.raises(RuntimeError, match="boom"), tracked(run):
        raise RuntimeError("boom")
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED" and "RuntimeError: boom" in got.data.tags["segtune.error"]

    stopped = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="s", trial_id="stopped",
                            parent_run_id=None, params={}, tags={})
    with pytest.raises(SystemExit), tracked(stopped, passes=(SystemExit,)):
        raise SystemExit(0)  # Tune stopping a trial: the driver closes the run
    assert client.get_run(stopped.run_id).info.status == "RUNNING"
    stopped.finish()
