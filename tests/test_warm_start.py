"""Warm start and budget in one real sweep: earlier finished trials on the MLflow server seed
Optuna, the one configuration not yet finished is the one that runs, and a tiny budget stops
the sweep from launching a second trial (#18 items 3 and 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import SearchDim, validate
from segtune.warm_start import in_space, point_key

LRS, BATCHES = [0.001, 0.003], [4, 8]


def _history_run(client: MlflowClient, exp_id: str, params: dict, value: float, *, status: str = "FINISHED",
                 prompt: str = "random_point") -> str:
    """A finished trial run of an earlier sweep, tagged and logged as segtune logs one."""
    tags = {"segtune.kind": "trial", "segtune.model": "sam_tiny", "segtune.dataset": "synthetic_em",
            "segtune.sweep_id": "earlier0", "segtune.trial_id": f"old_{len(params)}_{value}"}
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("val/dice", value, now, 1)],
                     params=[Param(k, str(v)) for k, v in {"model.train": "full", "prompt.train": prompt,
                                                           **params}.items()],
                     tags=[RunTag("mlflow.runName", f"earlier {params}")])
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture
def warm_sweep(tiny_config):
    """History on the server, then one sweep over 4 configurations warm-started from it, with a
    CPU-hour budget that the first trial spends. Returns (config, outcome, history, log lines)."""
    raw = tiny_config.model_dump()
    raw["train"]["epochs"] = 1
    raw["search"].update(space={"train.lr": {"choice": LRS}, "train.batch_size": {"choice": BATCHES}},
                         num_samples=2, max_concurrent=1, budget_gpu_hours=1e-6, scheduler="fifo")
    cfg = validate(raw, "test")
    client = MlflowClient(cfg.tracking.uri)
    exp_id = client.create_experiment(cfg.tracking.experiment)
    # Three of the four configurations finished before, with poor scores: TPE looks elsewhere.
    seeded = [_history_run(client, exp_id, {"train.lr": lr, "train.batch_size": bs}, v)
              for (lr, bs), v in [((0.001, 4), 0.10), ((0.001, 8), 0.12), ((0.003, 4), 0.11)]]
    skipped = {"outside": _history_run(client, exp_id, {"train.lr": 0.01, "train.batch_size": 4}, 0.5),
               "missing": _history_run(client, exp_id, {"train.lr": 0.001}, 0.5)}
    ignored = [_history_run(client, exp_id, {"train.lr": 0.003, "train.batch_size": 8}, 0.9, prompt="box"),
               _history_run(client, exp_id, {"train.lr": 0.003, "train.batch_size": 8}, 0.9, status="FAILED")]
    lines: list[str] = []
    outcome = run_sweep(cfg, warm_start="auto", log=lines.append)
    return cfg, outcome, {"seeded": seeded, "skipped": skipped, "ignored": ignored}, lines


def test_warm_start_seeds_the_searcher_and_the_budget_stops_launching(warm_sweep, tmp_path) -> None:
    cfg, outcome, history, lines = warm_sweep
    client = MlflowClient(cfg.tracking.uri)
    sweep_run = client.get_run(outcome.parent_run_id)
    tags, text = sweep_run.data.tags, "\n".join(lines)

    # Warm start: the three matching finished runs seeded it; the other two were reported and skipped.
    assert tags["segtune.warm_start.count"] == "3"
    assert set(tags["segtune.warm_start.runs"].split(",")) == set(history["seeded"])
    assert tags["segtune.warm_start.skipped"] == "2"
    assert f"skipped run {history['skipped']['outside']}: train.lr=0.01 is not one of" in text
    assert f"skipped run {history['skipped']['missing']}: it has no param train.batch_size" in text
    for rid in history["ignored"]:
        assert rid not in text and rid not in tags["segtune.warm_start.runs"]
    record = json.loads(Path(client.download_artifacts(outcome.parent_run_id, "warm_start.json",
                                                       str(tmp_path))).read_text())
    assert {r["run_id"] for r in record["runs"]} == set(history["seeded"])
    assert set(record["skipped"]) == set(history["skipped"].values())

    # Budget: one trial ran (num_samples is 2), said in the log and on the sweep run.
    assert len(outcome.statuses) == 1 and outcome.finished == 1
    assert tags["segtune.budget_stopped"] == "true"
    assert "CPU-hours: the trials hold no GPU" in text and "budget spent:" in text
    assert "stopped launching trials at" in text

    # The trial that ran is the one configuration that had not finished before.
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    trials = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{outcome.sweep_id}' and tags.`segtune.kind` = 'trial'"))
    assert len(trials) == 1
    p = trials[0].data.params
    assert (float(p["train.lr"]), int(p["train.batch_size"])) == (0.003, 8)

    # Cost: the trial's CPUs x wall time, and the sweep run's sum of it.
    m = trials[0].data.metrics
    assert m["cost/gpu_hours"] == 0.0 and 0 < m["cost/cpu_hours"] < 0.1
    assert sweep_run.data.metrics["cost/cpu_hours"] == pytest.approx(m["cost/cpu_hours"])
    assert sweep_run.data.metrics["cost/gpu_hours"] == 0.0


def test_logged_params_map_onto_the_current_space() -> None:
    lr = SearchDim(loguniform=(1e-4, 1e-2))
    assert in_space("train.lr", "0.001", lr) == (0.001, None)
    assert in_space("train.lr", "0.1", lr)[1] == "train.lr=0.1 is outside [0.0001, 0.01]"
    epochs = SearchDim(randint=(1, 3))
    assert in_space("train.epochs", "3", epochs) == (3, None)
    assert in_space("train.epochs", "2.5", epochs)[1] == "train.epochs=2.5 is not an integer"
    batch = SearchDim(choice=[4, 8])
    assert in_space("train.batch_size", "8", batch) == (8, None)
    assert in_space("train.batch_size", "8.0", batch) == (8, None)
    assert in_space("train.batch_size", "2", batch)[1] == "train.batch_size=2 is not one of [4, 8]"
    assert point_key({"a": 4, "b": "x"}) == point_key({"b": "x", "a": 4.0})


def test_warm_start_from_an_experiment_that_does_not_exist_names_it(tiny_config) -> None:
    from segtune.errors import ConfigError
    from segtune.warm_start import load

    with pytest.raises(ConfigError, match="--warm-start no-such-experiment: there is no MLflow experiment"):
        load(tiny_config, "no-such-experiment", log=lambda _: None)
    assert load(tiny_config, tiny_config.tracking.experiment, log=lambda _: None).points == []  # auto, first sweep
