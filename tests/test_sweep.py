"""A real 3-trial sweep: Ray Tune + OptunaSearch + ASHA -> MLflow runs -> `segtune runs` / `promote`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import apply_params
from tracking.errors import TrackingError
from tracking.registry import check_alias

SEGTUNE = [sys.executable, "-m", "segtune.cli"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGTUNE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, em_data, mlflow_server):
    """One 3-trial sweep for the module; returns (config, outcome)."""
    from segtune.config import load_config
    from tests.conftest import DEMO

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=4",
        "search.num_samples=3", "search.space.train.epochs={randint: [1, 2]}",
        "search.space.train.batch_size={choice: [4, 8]}", "search.grace_period=1", "search.finalists=2",
        f"search.storage_path={tmp / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=sweep-test",
    ])
    return cfg, run_sweep(cfg, log=lambda _: None)


def test_one_finished_child_run_per_trial_under_one_parent(swept) -> None:
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`segtune.sweep_id` = '{outcome.sweep_id}'")
    parents = [r for r in runs if r.data.tags["segtune.kind"] == "sweep"]
    children = [r for r in runs if r.data.tags["segtune.kind"] == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].info.status == "FINISHED"
    assert len({r.data.tags["segtune.trial_id"] for r in children}) == 3
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert r.info.status == "FINISHED"
        for tag in ("segtune.model", "segtune.dataset", "segtune.git_sha", "segtune.data_hash"):
            assert r.data.tags[tag]
        pruned = r.data.tags.get("segtune.pruned") == "true"
        # Every trial that ran all its epochs is scored on test; a pruned one is not.
        assert ("test/iou" in r.data.metrics) != pruned
        epochs = int(r.data.params["train.epochs"])
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val/dice"))
        assert steps == list(range(1, len(steps) + 1)) and (pruned or len(steps) == epochs)
    assert parents[0].data.tags["segtune.best.run_id"] in {r.info.run_id for r in children}


def test_the_sweep_run_says_what_mattered(swept, tmp_path) -> None:
    """segtune.insight at the sweep's end: importance, figures and a narrowed space (tests/test_insight.py
    checks the numbers on runs of known scores)."""
    import yaml

    from segtune.config import SearchDim

    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(outcome.parent_run_id)
    importance = {k: v for k, v in run.data.metrics.items() if k.startswith("importance/")}
    assert set(importance) == {f"importance/{k}" for k in cfg.search.space}
    assert sum(importance.values()) == pytest.approx(1.0)
    names = {Path(f.path).name for f in client.list_artifacts(outcome.parent_run_id, "insight")}
    assert names == {"importance.png", "parallel_coordinates.png", "suggested_space.yaml"}
    text = Path(client.download_artifacts(outcome.parent_run_id, "insight/suggested_space.yaml", str(tmp_path)))
    space = {k: SearchDim(**v) for k, v in yaml.safe_load(text.read_text())["search"]["space"].items()}
    assert set(space) == set(cfg.search.space)
    assert space["train.epochs"].kind == "randint" and 1 <= space["train.epochs"].args[0] < space["train.epochs"].args[1] <= 2


def test_runs_lists_the_trials(swept) -> None:
    cfg, outcome = swept
    res = cli("runs", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id)
    assert res.returncode == 0, res.stderr
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    for r in client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'trial'"):
        assert r.data.tags["segtune.trial_id"] in res.stdout


def test_runs_json_gives_every_trial_with_its_scores(swept) -> None:
    import json

    cfg, outcome = swept
    res = cli("runs", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["experiment"] == "sweep-test" and got["sweep_id"] == outcome.sweep_id
    client = MlflowClient(cfg.tracking.uri)
    by_run = {t["run_id"]: t for t in got["trials"]}
    assert {t["trial_id"] for t in got["trials"]} == set(outcome.statuses)
    for run_id, trial in by_run.items():
        metrics = client.get_run(run_id).data.metrics
        assert trial["val_dice_best"] == metrics.get("val/dice_best")
        assert trial["test_iou"] == metrics.get("test/iou")
    assert outcome.finished == len(got["trials"]) and outcome.failed == 0


MODEL = "segtune-sweep-test"  # its own registered name: other modules promote tiny SAMs on this server too


def _best(client: MlflowClient, sweep_id: str):
    exp = client.get_experiment_by_name("sweep-test")
    trials = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{sweep_id}' and tags.`segtune.kind` = 'trial'"))
    eligible = [r for r in trials if "val/dice_best" in r.data.metrics and r.data.tags.get("segtune.pruned") != "true"]
    return max(eligible, key=lambda r: r.data.metrics["val/dice_best"])


@pytest.fixture(scope="module")
def challenger(swept):
    """`segtune promote` of the sweep: (version, best run)."""
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    res = cli("promote", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id,
              "--name", MODEL)
    assert res.returncode == 0, res.stderr
    assert "gate rescore: passed" in res.stdout and f"segtune approve {MODEL} --version" in res.stdout
    assert f"/#/models/{MODEL}/versions/" in res.stdout  # the version's own page
    return client.get_model_version_by_alias(MODEL, "challenger"), _best(client, outcome.sweep_id)


def test_promote_registers_the_best_validation_run_as_challenger_with_its_gates(swept, challenger) -> None:
    cfg, _ = swept
    client = MlflowClient(cfg.tracking.uri)
    version, best = challenger
    assert version.tags["segtune.run_id"] == best.info.run_id
    assert version.tags["segtune.metric"] == "val/dice_best"
    assert len(version.tags["segtune.sha256"]) == 64
    assert version.tags["segtune.gates"] == "passed"
    for gate in ("checkpoint", "data", "rescore", "margin"):
        assert version.tags[f"segtune.gate.{gate}"] == "passed"
    assert version.tags["segtune.data_hash"] == best.data.tags["segtune.data_hash"]
    rescored = float(version.tags["segtune.rescore_dice"])
    assert rescored == pytest.approx(best.data.metrics["val/dice_best"], abs=0.01)
    assert version.tags["segtune.prompt_kinds"] == "points,box"
    # The report: the version's description and a Markdown artifact on the trial's run.
    assert f"Gates of {MODEL} v{version.version}: passed" in version.description
    report = client.download_artifacts(best.info.run_id, f"gates/{MODEL}-v{version.version}.md")
    assert Path(report).read_text() == version.description
    assert client.get_run(best.info.run_id).info.status == "FINISHED"
    with pytest.raises(Exception, match="champion"):  # promote alone does not make a champion
        client.get_model_version_by_alias(MODEL, "champion")


def test_approve_makes_the_challenger_champion_and_records_who_when_why(swept, challenger, tmp_path) -> None:
    import os

    cfg, _ = swept
    client = MlflowClient(cfg.tracking.uri)
    version, _ = challenger
    res = subprocess.run([*SEGTUNE, "approve", MODEL, "--version", version.version, "--reason", "best of the sweep",
                          "--tracking-uri", cfg.tracking.uri], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_USERNAME": "alice"})
    assert res.returncode == 0, res.stderr
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == version.version
    assert champion.tags["segtune.approved_by"] == "alice"
    assert champion.tags["segtune.approval_reason"] == "best of the sweep"
    assert champion.tags["segtune.approval_forced"] == "false"
    assert champion.tags["segtune.approved_at"].startswith("20")

    # The champion is a pyfunc that predicts masks.
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    image = np.full((256, 256), 150, np.uint8)
    image[100:140, 90:150] = 40
    for prompt in ({"points": [[120, 120]]}, {"box": [90, 100, 150, 140]}):
        masks = model.predict({"image": image, **prompt})
        assert masks[0].shape == (256, 256) and set(np.unique(masks[0])) <= {0, 1}


def test_a_version_failing_a_gate_cannot_take_champion(swept, challenger) -> None:
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    version, _ = challenger
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    # A tolerance no re-score meets: the new version fails that gate, and --approve refuses it.
    res = cli("promote", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id,
              "--name", MODEL, "--tolerance", "-1", "--approve")
    assert res.returncode == 1 and "failed its gates (rescore)" in res.stderr and "Traceback" not in res.stderr
    failed = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    failed = client.get_model_version(MODEL, failed.version)
    assert failed.tags["segtune.gates"] == "failed" and failed.tags["segtune.gate.rescore"] == "failed"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version

    res = cli("approve", MODEL, "--version", failed.version, "--reason", "try", "--tracking-uri", cfg.tracking.uri)
    assert res.returncode == 1 and "failed its gates: rescore" in res.stderr and "--force" in res.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version

    res = cli("approve", MODEL, "--version", failed.version, "--reason", "rollback drill", "--force",
              "--tracking-uri", cfg.tracking.uri)
    assert res.returncode == 0, res.stderr
    forced = client.get_model_version_by_alias(MODEL, "champion")
    assert forced.version == failed.version and forced.tags["segtune.approval_forced"] == "true"
    assert forced.tags["segtune.approved_over"] == version.version

    res = cli("approve", MODEL, "--version", version.version, "--reason", "back", "--tracking-uri", cfg.tracking.uri)
    assert res.returncode == 0, res.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    for bad in (["--version", "999"], ["--version", version.version, "--reason", " "]):
        res = cli("approve", MODEL, *bad, *([] if "--reason" in bad else ["--reason", "x"]),
                  "--tracking-uri", cfg.tracking.uri)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert ("versions are" in res.stderr) or ("--reason" in res.stderr)


def test_promote_refuses_unfinished_unscored_and_altered_runs(swept, mlflow_server) -> None:
    cfg, _ = swept
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    running = client.create_run(exp.experiment_id, tags={"segtune.kind": "manual"})
    client.log_metric(running.info.run_id, "val/dice_best", 0.99)
    res = cli("promote", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--run", running.info.run_id)
    assert res.returncode == 1 and "not FINISHED" in res.stderr and "Traceback" not in res.stderr
    client.set_terminated(running.info.run_id)
    res = cli("promote", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--run", running.info.run_id,
              "--metric", "val/absent")
    assert res.returncode == 1 and "val/absent" in res.stderr

    # Alter the best checkpoint on the server's artifact store: promotion must refuse it.
    run_id = _best(client, swept[1].sweep_id).info.run_id
    weights = [p for p in Path(mlflow_server.home).rglob("model.safetensors")
               if run_id in p.as_posix() and "checkpoints/best" in p.as_posix()]
    assert weights, "checkpoint file not found in the server's artifact store"
    original = weights[0].read_bytes()
    weights[0].write_bytes(original + b"tampered")
    try:
        res = cli("promote", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--run", run_id)
    finally:
        weights[0].write_bytes(original)  # the module's other tests promote this run again
    assert res.returncode == 1 and "altered" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("alias", ["latest", "v3", "has space"])
def test_reserved_aliases_are_refused_before_any_request(alias) -> None:
    with pytest.raises(TrackingError, match="alias"):
        check_alias(alias)


def test_trial_params_apply_to_a_copy(swept) -> None:
    cfg, _ = swept
    changed = apply_params(cfg, {"train.lr": 0.5})
    assert changed.train.lr == 0.5 and cfg.train.lr != 0.5


def test_racing_promotions_leave_the_alias_on_the_best(swept) -> None:
    import threading

    from segtune.promotion import promote

    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    done = [r for r in client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{outcome.sweep_id}' and tags.`segtune.kind` = 'trial'"))
        if "val/dice_best" in r.data.metrics and r.data.tags.get("segtune.pruned") != "true"]
    assert done
    errors: list[BaseException] = []

    def go(run_id: str) -> None:
        try:
            promote(cfg.tracking.uri, "sweep-test", run_id=run_id, alias="race", name="segtune-race-test",
                    log=lambda _: None)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=go, args=(r.info.run_id,)) for r in done * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    best = max(done, key=lambda r: r.data.metrics["val/dice_best"])
    winner = client.get_model_version_by_alias("segtune-race-test", "race")
    assert float(winner.tags["segtune.metric_value"]) == pytest.approx(best.data.metrics["val/dice_best"])
    # Every version was judged on its own registered weights.
    for v in client.search_model_versions("name = 'segtune-race-test'"):
        assert client.get_model_version("segtune-race-test", v.version).tags["segtune.gates"] == "passed"


def test_the_finalists_carry_the_robustness_matrix_and_the_sweep_its_heatmap(swept, tmp_path) -> None:
    import csv

    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    trials = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{outcome.sweep_id}' and tags.`segtune.kind` = 'trial'"))
    eligible = [r for r in trials if "val/dice_best" in r.data.metrics and r.data.tags.get("segtune.pruned") != "true"]
    finalists = [r for r in trials if any(k.startswith("robust/") for k in r.data.metrics)]
    assert len(finalists) == min(2, len(eligible))  # search.finalists=2: the best by val/dice_best
    others = [r for r in eligible if r.info.run_id not in {f.info.run_id for f in finalists}]
    assert all(f.data.metrics["val/dice_best"] >= o.data.metrics["val/dice_best"] for f in finalists for o in others)
    for r in finalists:
        assert {"robust/box/iou", "robust/jittered_box/iou", "robust/clicks_5/iou"} <= set(r.data.metrics)
        assert r.data.tags["segtune.robust.split"] == "val"
    local = Path(client.download_artifacts(outcome.parent_run_id, "robustness", str(tmp_path)))
    with (local / "robustness.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {row["run_id"] for row in table} == {r.info.run_id for r in finalists}
    assert {row["trial_id"] for row in table} == {r.data.tags["segtune.trial_id"] for r in finalists}
    for row in table:
        assert float(row["iou"]) == pytest.approx(
            client.get_run(row["run_id"]).data.metrics[f"robust/{row['eval_prompt']}/iou"])
    assert (local / "robustness.png").stat().st_size > 0


def test_promote_with_prompt_floors_it_meets_passes_reading_the_finalists_scores(swept) -> None:
    from segtune.promotion import promote

    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    p = promote(cfg.tracking.uri, "sweep-test", sweep_id=outcome.sweep_id, name="segtune-sweep-floors",
                min_prompt_iou={"box": 0.0, "random_point": 0.0, "clicks_1": 0.0}, log=lambda _: None)
    assert p.passed
    gate = next(g for g in p.gates if g.name == "prompt_iou")
    assert gate.passed and "read from the run" in gate.detail and "clicks_1" in gate.detail
    version = client.get_model_version("segtune-sweep-floors", p.version)
    assert version.tags["segtune.gate.prompt_iou"] == "passed" and version.tags["segtune.gates"] == "passed"
    assert "| prompt_iou | passed |" in version.description


def test_every_trial_logs_its_cost_and_the_sweep_run_their_sums(swept) -> None:
    cfg, outcome = swept
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("sweep-test")
    trials = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{outcome.sweep_id}' and tags.`segtune.kind` = 'trial'"))
    # A CPU sweep: CPU-hours, pruned trials included (their cost is logged before each report).
    assert all(r.data.metrics["cost/cpu_hours"] > 0 and r.data.metrics["cost/gpu_hours"] == 0 for r in trials)
    sums = client.get_run(outcome.parent_run_id).data.metrics
    assert sums["cost/cpu_hours"] == pytest.approx(sum(r.data.metrics["cost/cpu_hours"] for r in trials))
    assert sums["cost/gpu_hours"] == 0
    res = cli("runs", "sweep-test", "--tracking-uri", cfg.tracking.uri, "--sweep", outcome.sweep_id)
    assert res.returncode == 0 and res.stdout.count("CPU-h") == len(trials), res.stdout
