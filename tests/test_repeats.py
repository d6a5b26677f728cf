"""Repeats (`search.repeats`): a real 2-trial sweep whose trials each run 2 fold members.

One module-scoped sweep (tiny SAM, 2 epochs, folds: 2, ranked on val/dice_lcb) serves the
run-tree, aggregate, turn-taking and promotion tests; the config and fold tests need no sweep.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from segtune.config import apply_params, load_config
from segtune.data.folds import fold_view, grouped_folds, source_groups
from segtune.errors import ConfigError
from segtune.repeats import aggregate
from tests.conftest import DEMO

EXPERIMENT, MODEL = "repeats-test", "segtune-repeats-test"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segtune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("repeats, fragment", [
    ("{seeds: 1}", "greater than or equal to 2"), ("{seeds: 2, folds: 2}", "exactly one"),
    ("{}", "exactly one"), ("{runs: 3}", "unknown field")])
def test_repeats_need_exactly_one_of_seeds_or_folds_of_at_least_two(repeats, fragment, tmp_path) -> None:
    with pytest.raises(ConfigError, match="search.repeats") as err:
        load_config(DEMO, [f"search.repeats={repeats}"])
    assert fragment in str(err.value)


def test_lcb_metric_without_repeats_is_refused_and_defaults_hold() -> None:
    with pytest.raises(ConfigError, match="search.*val/dice_lcb exists only with repeats"):
        load_config(DEMO, ["search.metric=val/dice_lcb"])
    cfg = load_config(DEMO, ["search.repeats={seeds: 3}"])
    assert cfg.search.repeats.kind == "seeds" and cfg.search.repeats.k == 3 and cfg.search.lcb_z == 1.0
    assert cfg.search.metric == "val/dice"


def test_aggregate_is_the_mean_sample_std_and_lcb() -> None:
    got = aggregate([{"epoch": 2, "val/dice": 0.2, "val/iou": 0.1, "test/iou": 0.3},
                     {"epoch": 2, "val/dice": 0.5, "val/iou": 0.4, "test/iou": 0.5},
                     {"epoch": 2, "val/dice": 0.8, "val/iou": 0.4, "test/iou": 0.7}], z=2.0)
    assert got["epoch"] == 2 and got["val/dice"] == pytest.approx(0.5) == got["val/dice_mean"]
    assert got["val/dice_std"] == pytest.approx(0.3)  # ddof 1
    assert got["val/dice_lcb"] == pytest.approx(0.5 - 2.0 * 0.3 / math.sqrt(3))
    assert got["test/iou_mean"] == pytest.approx(0.5) and got["test/iou_std"] == pytest.approx(0.2)


@pytest.mark.parametrize("k", [2, 3])
def test_grouped_folds_keep_each_source_image_on_one_side_and_the_test_split_still(tiny_config, k) -> None:
    from segtune.data import open_store
    from segtune.prepare import prepare_data

    store, data_hash = prepare_data(tiny_config, lambda _: None)
    index = json.loads((store / "index.json").read_text())
    pool = sorted(index["splits"]["train"] + index["splits"]["val"])
    folds = grouped_folds(index, k)
    assert sorted(i for _, val in folds for i in val) == pool  # every pool sample validated once
    samples = index["samples"]
    key = lambda i: (samples[i]["source"], samples[i]["slice"])  # noqa: E731
    for i, (train, val) in enumerate(folds):
        assert sorted(train + val) == pool and not {key(j) for j in train} & {key(j) for j in val}
        view = open_store(fold_view(store, k, i))
        assert view.index["splits"]["train"] == train and view.index["splits"]["val"] == val
        assert view.index["splits"]["test"] == index["splits"]["test"]  # the test split never moves
        assert view.hash == data_hash and len(view.split("val")) == len(val)
        assert (fold_view(store, k, i) / "embeddings").resolve() == (store / "embeddings").resolve()
    assert len(source_groups(samples, pool)) >= k


@pytest.fixture(scope="module")
def swept(tmp_path_factory, em_data, mlflow_server):
    """A 2-trial sweep with folds: 2, ranked on val/dice_lcb: (config, outcome)."""
    from segtune.commands import run_sweep

    tmp = tmp_path_factory.mktemp("repeats")
    cfg = load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=4", "train.epochs=2", "train.batch_size=4",
        # FIFO: ASHA (grace 1) may stop either trial after its first epoch, depending on which
        # reports first, and these tests check complete members.
        "search.num_samples=2", "search.scheduler=fifo", "search.space.train.epochs={choice: [2]}",
        "search.space.train.batch_size={choice: [4]}", "search.grace_period=1",
        "search.repeats={folds: 2}", "search.metric=val/dice_lcb", "search.finalists=0",
        f"search.storage_path={tmp / 'ray'}", f"tracking.spool_dir={tmp / 'spool'}",
        f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={EXPERIMENT}",
    ])
    return cfg, run_sweep(cfg, log=lambda _: None)


def _runs(cfg, sweep_id: str, kind: str) -> list:
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{sweep_id}' and tags.`segtune.kind` = '{kind}'"))


def test_sweep_trial_member_is_a_three_level_tree_of_named_runs(swept) -> None:
    cfg, outcome = swept
    assert outcome.finished == 2 and not outcome.interrupted
    (sweep,) = _runs(cfg, outcome.sweep_id, "sweep")
    trials, members = _runs(cfg, outcome.sweep_id, "trial"), _runs(cfg, outcome.sweep_id, "member")
    assert len(trials) == 2 and len(members) == 4
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == sweep.info.run_id and trial.info.status == "FINISHED"
        assert trial.data.tags["segtune.repeats"] == "folds:2" and trial.data.tags["mlflow.runName"]
        mine = [m for m in members if m.data.tags["mlflow.parentRunId"] == trial.info.run_id]
        assert sorted(m.data.tags["segtune.member"] for m in mine) == ["0", "1"]
        for m in mine:
            assert m.data.tags["segtune.trial_id"] == trial.data.tags["segtune.trial_id"]
            assert m.info.status == "FINISHED" and m.data.tags["mlflow.runName"].startswith("member ")
            assert m.data.tags["segtune.fold"] == f"{m.data.tags['segtune.member']}/2"
            names = {a.path.split("/")[-1] for a in MlflowClient(cfg.tracking.uri).list_artifacts(
                m.info.run_id, "checkpoints/best")}
            assert {"model.safetensors", "manifest.json"} <= names  # members keep their checkpoints
    assert sweep.data.tags["segtune.best.run_id"] in {t.info.run_id for t in trials}


def test_trial_metrics_are_the_members_mean_std_and_lcb_per_epoch(swept) -> None:
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    members = _runs(cfg, outcome.sweep_id, "member")

    def history(run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    for trial in _runs(cfg, outcome.sweep_id, "trial"):
        mine = [m for m in members if m.data.tags["mlflow.parentRunId"] == trial.info.run_id]
        per_member = [history(m.info.run_id, "val/dice") for m in mine]
        assert all(sorted(h) == [1, 2] for h in per_member)
        for epoch in (1, 2):
            values = np.array([h[epoch] for h in per_member])
            mean, std = values.mean(), values.std(ddof=1)
            assert history(trial.info.run_id, "val/dice_mean")[epoch] == pytest.approx(mean)
            assert history(trial.info.run_id, "val/dice")[epoch] == pytest.approx(mean)
            assert history(trial.info.run_id, "val/dice_std")[epoch] == pytest.approx(std)
            assert history(trial.info.run_id, "val/dice_lcb")[epoch] == pytest.approx(mean - std / math.sqrt(2))
        tests = np.array([m.data.metrics["test/iou"] for m in mine])
        got = trial.data.metrics
        assert got["test/iou_mean"] == pytest.approx(tests.mean()) == got["test/iou"]
        assert got["test/iou_std"] == pytest.approx(tests.std(ddof=1))
        best = max(mine, key=lambda m: m.data.metrics["val/dice_best"])
        assert trial.data.tags["segtune.best_member"] == best.data.tags["segtune.member"]


def test_members_taking_turns_compute_what_one_alone_computes(swept, tmp_path) -> None:
    """Member 1 of a trial, trained again alone in this process, logs the same curve."""
    from segtune.prepare import prepare_data
    from segtune.train import TrialContext, run_trial

    cfg, outcome = swept
    trial = _runs(cfg, outcome.sweep_id, "trial")[0]
    member = next(m for m in _runs(cfg, outcome.sweep_id, "member")
                  if m.data.tags["mlflow.parentRunId"] == trial.info.run_id and m.data.tags["segtune.member"] == "1")
    mcfg = apply_params(cfg, {"train.lr": float(member.data.params["train.lr"])})
    store = fold_view(prepare_data(mcfg, lambda _: None)[0], 2, 1)
    alone = run_trial(mcfg, TrialContext(store=store, workdir=tmp_path, log=lambda _: None))
    logged = {m.step: m.value for m in MlflowClient(cfg.tracking.uri).get_metric_history(member.info.run_id, "val/dice")}
    assert alone["val/dice"] == pytest.approx(logged[2], abs=1e-5)
    assert alone["test/iou"] == pytest.approx(member.data.metrics["test/iou"], abs=1e-5)


def test_promote_ranks_trials_by_lcb_and_registers_the_best_members_checkpoint(swept) -> None:
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    res = cli("promote", EXPERIMENT, "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id, "--name", MODEL)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    version = client.get_model_version_by_alias(MODEL, "challenger")
    trials = _runs(cfg, outcome.sweep_id, "trial")
    chosen = max(trials, key=lambda r: r.data.metrics["val/dice_lcb"])
    assert version.tags["segtune.metric"] == "val/dice_lcb"
    assert float(version.tags["segtune.metric_value"]) == pytest.approx(chosen.data.metrics["val/dice_lcb"])
    assert version.tags["segtune.trial_run_id"] == chosen.info.run_id
    members = [m for m in _runs(cfg, outcome.sweep_id, "member")
               if m.data.tags["mlflow.parentRunId"] == chosen.info.run_id]
    best = max(members, key=lambda m: m.data.metrics["val/dice_best"])
    assert version.tags["segtune.run_id"] == best.info.run_id
    assert version.tags["segtune.member"] == best.data.tags["segtune.member"]
    manifest = json.loads(Path(client.download_artifacts(best.info.run_id, "checkpoints/best/manifest.json")).read_text())
    assert version.tags["segtune.sha256"] == manifest["sha256"]
    # Re-scored on the member's own fold: the rescore and data gates hold.
    assert version.tags["segtune.gate.rescore"] == "passed" and version.tags["segtune.gate.data"] == "passed"


def test_promote_ensemble_registers_every_member_with_its_test_iou(swept) -> None:
    from segtune.commands import promote_best
    from tracking.errors import TrackingError

    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    p = promote_best(cfg.tracking.uri, EXPERIMENT, sweep_id=outcome.sweep_id, name=f"{MODEL}-ensemble",
                     ensemble=True, log=lambda _: None)
    version = client.get_model_version(p.name, p.version)
    assert p.metric == "val/dice_lcb" and version.tags["segtune.member"] == "ensemble"
    assert len(version.tags["segtune.members"].split(",")) == 2
    assert 0.0 <= float(version.tags["segtune.ensemble_test_iou"]) <= 1.0
    # Loaded back as serving loads it, it re-scored at least its members' mean val/dice_best.
    assert version.tags["segtune.gate.checkpoint"] == "passed" and version.tags["segtune.gate.rescore"] == "passed"
    member = _runs(cfg, outcome.sweep_id, "member")[0].info.run_id
    with pytest.raises(TrackingError, match="--ensemble: run .* has no members"):
        promote_best(cfg.tracking.uri, EXPERIMENT, run_id=member, ensemble=True, name=f"{MODEL}-x", log=lambda _: None)
