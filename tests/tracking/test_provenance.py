"""Provenance in MLflow's own terms, on a real server: source, user and dataset input on every
kind of run segtune opens, the experiment kind, and the UI links segtune prints."""

from __future__ import annotations

import getpass
import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from segtune.config import flatten
from segtune.prepare import prepare_data
from segtune.provenance import git_sha
from segtune.trial import SweepContext, open_single_trial, open_sweep_trial, run_tags
from tests.conftest import REPO
from tracking.evals import ZERO_SHOT, open_run
from tracking.lineage import EXPERIMENT_KIND, MODEL_TRAINING
from tracking.runs import experiment_id, start_sweep_run
from tracking.urls import experiment_runs_url, model_version_url, run_url, run_url_of, runs_url

BUNDLE = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


@pytest.fixture
def opened(tiny_config, tmp_path: Path, monkeypatch):
    """One run of each kind, opened the way the commands open them: (cfg, store, hash, {kind: run})."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = tiny_config
    store, data_hash = prepare_data(cfg, log=lambda _: None)
    sha = git_sha(REPO)
    tags = run_tags(cfg, git_sha=sha, data_hash=data_hash, store=store)
    parent = start_sweep_run(cfg.tracking.uri, cfg.tracking.experiment, "s1", flatten(cfg), tags=tags)
    sweep = SweepContext(store=str(store), data_hash=data_hash, sweep_id="s1", parent_run_id=parent,
                         git_sha=sha, spool_dir=str(tmp_path / "spool"))
    trial = open_sweep_trial(cfg, sweep, "t1", node_id="node")
    single = open_single_trial(cfg, git_sha=sha, data_hash=data_hash, store=store)
    evaluation = open_run(cfg.tracking.uri, cfg.tracking.experiment, kind=ZERO_SHOT, run_name="zs",
                          params=flatten(cfg), tags=tags)
    client = MlflowClient(cfg.tracking.uri)
    runs = {kind: client.get_run(rid) for kind, rid in [("sweep", parent), ("trial", trial.run_id),
                                                        ("train", single.run_id), ("zero_shot", evaluation.run_id)]}
    return cfg, store, data_hash, runs


def test_every_run_names_its_commit_user_and_source(opened) -> None:
    cfg, _, _, runs = opened
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    for kind, run in runs.items():
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == head, kind
        assert tags["mlflow.user"] == getpass.getuser() == run.info.user_id, kind
        assert tags["mlflow.source.name"] == f"segtune {cfg.name}", kind
        # Ray runs a sweep's trials as jobs; the commands themselves run where they are typed.
        assert tags["mlflow.source.type"] == ("JOB" if kind == "trial" else "LOCAL"), kind


def test_every_run_logs_its_prepared_store_as_a_dataset_input(opened) -> None:
    cfg, store, data_hash, runs = opened
    counts = json.loads((store / "index.json").read_text())["counts"]["samples"]
    for kind, run in runs.items():
        (entry,) = run.inputs.dataset_inputs
        ds = entry.dataset
        assert ds.digest == data_hash[:36] and len(ds.digest) == 36, kind  # all of the hash MLflow keeps
        assert ds.name == cfg.dataset.name and ds.source_type == "local", kind
        assert json.loads(ds.source) == {"uri": str(store)}, kind
        profile = json.loads(ds.profile)
        assert profile == {"samples": counts, "hash": data_hash}, kind
        assert set(profile["samples"]) == {"train", "val", "test"}, kind
        context = {t.key: t.value for t in entry.tags}["mlflow.data.context"]
        assert context == ("evaluation" if kind == "zero_shot" else "training"), kind


def test_the_tracking_user_name_is_the_user_and_no_password_is_logged(tiny_config, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tracking-pw-456")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    tags = run_tags(tiny_config, git_sha="abc123-dirty", data_hash="unknown")
    assert tags["mlflow.user"] == "alice" and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.git.commit"] == "abc123"  # MLflow's field is the commit; segtune.git_sha says dirty
    assert "tracking-pw-456" not in json.dumps(tags)
    assert "segtune.store" not in tags  # no store given: no dataset input, nothing invented
    assert "mlflow.source.git.commit" not in run_tags(tiny_config, git_sha="unknown", data_hash="x")


def test_experiments_are_marked_as_model_training(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.uri)
    created = client.get_experiment(experiment_id(client, "provenance-new"))
    assert created.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    old = client.create_experiment("provenance-old")  # made before segtune logged into it
    chosen = client.create_experiment("provenance-chosen", tags={EXPERIMENT_KIND: "genai_development"})
    assert experiment_id(client, "provenance-old") == old
    experiment_id(client, "provenance-chosen")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND] == "genai_development"  # a user's choice stays


def test_the_installed_ui_knows_the_kind_and_the_routes_the_links_use() -> None:
    js = "".join(p.read_text(errors="replace") for p in BUNDLE.glob("*.js"))
    assert '"mlflow.experimentKind"' in js and f'="{MODEL_TRAINING}"' in js and '="finetuning"' in js
    for route in ('"/experiments/:experimentId/runs"', '"/experiments/:experimentId/runs/:runUuid"',
                  '"/models/:modelName/versions/:version"'):
        assert route in js, route
    assert 'get("workflowType")' in js and 'MACHINE_LEARNING="machine_learning"' in js


def test_links_lead_to_the_runs_the_run_and_the_model_version(opened, mlflow_server) -> None:
    cfg, _, _, runs = opened
    base, run = mlflow_server.uri, runs["trial"]
    exp = run.info.experiment_id
    assert runs_url(base, exp) == f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert experiment_runs_url(base, cfg.tracking.experiment) == runs_url(base, exp)
    assert run_url(base, exp, run.info.run_id) == run_url_of(base, run.info.run_id) == (
        f"{base}/#/experiments/{exp}/runs/{run.info.run_id}?workflowType=machine_learning")
    assert model_version_url(base + "/", "segtune-sam_tiny-synthetic_em", 3) == (
        f"{base}/#/models/segtune-sam_tiny-synthetic_em/versions/3")
    # A password in the tracking URI never reaches a link; a URI with no UI has no link.
    port = base.rsplit(":", 1)[1]
    assert runs_url(f"http://alice:pw-123@127.0.0.1:{port}", exp) == runs_url(base, exp)
    assert runs_url("sqlite:///mlflow.db", exp) is None and experiment_runs_url(base, "no-such") is None
