"""`segtune report` places a run in a thesis column only when its logged params match the row's
reference; others are shown apart with the reason. Runs are made on the real test server with
the params a run logs (the report reads nothing else), so this needs no training."""

from __future__ import annotations

import time

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tracking.placement import reference_settings
from tracking.runs import experiment_id
from tracking.study_report import APART, SWEEP, ZS, FileSpec, as_dict, collect, columns, markdown

EXPERIMENT = "report-placement"
FILE = {"model.name": "sam", "model.variant": "tiny", "model.train": "mask_decoder", "prompt.train": "random_point",
        "prompt.eval": "random_point", "prompt.text": None, "eval.protocol": "prompted", "train.epochs": 20,
        "dataset.max_train": None, "dataset.max_eval": None, "eval.sample": None}
_clock = [int(time.time() * 1000)]


def _run(uri: str, name: str, kind: str, metrics: dict[str, float], sweep_id: str = "none", **changes) -> str:
    """A finished run of experiment file `name` that logged FILE's settings with `changes`."""
    client = MlflowClient(uri)
    _clock[0] += 1000  # distinct start times: "newer" is what the report compares
    rid = client.create_run(experiment_id(client, EXPERIMENT), start_time=_clock[0], tags={
        "segtune.kind": kind, "segtune.sweep_id": sweep_id}).info.run_id
    params = {**FILE, **{k.replace("__", "."): v for k, v in changes.items()}, "name": name}
    client.log_batch(rid, metrics=[Metric(k, v, _clock[0], 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid)
    return rid


def _spec(uri: str, name: str, row: str, epochs: int | None, settings: bool = True) -> FileSpec:
    return FileSpec(name=name, uri=uri, experiment=EXPERIMENT, row=row, dataset="EM", setting=row, model="sam_tiny",
                    thesis_iou=0.25, epochs=epochs, settings=reference_settings(FILE) if settings else {})


@pytest.fixture(scope="module")
def placed(mlflow_server):
    """Rows built from one set of runs: (rows by key, run ids by role, the Markdown, the labels tracked)."""
    uri = mlflow_server.uri
    ids = {
        "full": _run(uri, "ft", "trial", {"test/iou": 0.30}),
        "reduced": _run(uri, "ft", "trial", {"test/iou": 0.90}, dataset__max_train=4, eval__sample=4),
        "short": _run(uri, "short", "trial", {"test/iou": 0.50}, train__epochs=2),
        "box": _run(uri, "prompt", "trial", {"test/iou": 0.60}, prompt__eval="box"),
        "zs_full": _run(uri, "zs", "zero_shot", {"test/iou": 0.10}),
        "zs_sampled": _run(uri, "zs", "zero_shot", {"test/iou": 0.20}, eval__sample=8, model__train="full"),
        "loose": _run(uri, "loose", "trial", {"test/iou": 0.40}, prompt__eval="box"),
        "loose_short": _run(uri, "loose", "trial", {"test/iou": 0.45}, train__epochs=3),
        "sweep": _run(uri, "sw", "sweep", {}, sweep_id="s9"),
        "trial_ok": _run(uri, "sw", "trial", {"val/dice_best": 0.5, "test/iou": 0.35}, sweep_id="s9", train__epochs=7),
        "trial_cut": _run(uri, "sw", "trial", {"val/dice_best": 0.9, "test/iou": 0.70}, sweep_id="s9",
                          dataset__max_eval=2),
    }
    specs = [_spec(uri, "ft", "ft", 20), _spec(uri, "short", "short", 20), _spec(uri, "prompt", "prompt", 20),
             _spec(uri, "zs", "zs", None), _spec(uri, "loose", "loose", 20, settings=False),
             _spec(uri, "sw", "sw", 20)]
    labels: list[str] = []

    def track(items, label):
        labels.append(label)
        yield from items

    rows = collect(specs, track)
    return {r.key: r for r in rows}, ids, markdown(rows, columns(specs)), labels


def test_a_full_run_is_placed_and_a_newer_reduced_one_is_shown_apart(placed) -> None:
    rows, ids, md, _ = placed
    cell, apart = rows["ft"].cells["20 epochs"], rows["ft"].apart["20 epochs"]
    assert (cell.run_id, cell.ours) == (ids["full"], pytest.approx(0.30))
    assert apart.run_id == ids["reduced"] and apart.reduced
    assert "dataset.max_train=4" in apart.why and "eval.sample=4" in apart.why
    table, _, below = md.partition(APART)
    assert "90.0%" not in table and "30.0%" in table  # the reduced run's number is not in the table
    assert ids["reduced"][:8] in below and "reduced: dataset.max_train=4" in below


def test_other_epochs_or_prompts_are_not_placed(placed) -> None:
    rows, ids, _, _ = placed
    for key, role, why in [("short", "short", "train.epochs=2 (reference 20)"),
                           ("prompt", "box", "prompt.eval=box (reference random_point)")]:
        assert rows[key].cells["20 epochs"].run_id is None, key
        apart = rows[key].apart["20 epochs"]
        assert apart.run_id == ids[role] and why in apart.why and not apart.reduced, key


def test_zero_shot_ignores_training_settings_but_not_sampling(placed) -> None:
    rows, ids, _, _ = placed
    assert rows["zs"].cells[ZS].run_id == ids["zs_full"]
    apart = rows["zs"].apart[ZS]
    assert apart.run_id == ids["zs_sampled"] and apart.why == "reduced: eval.sample=8"  # model.train not held


def test_without_the_files_settings_the_epochs_still_decide(placed) -> None:
    rows, ids, _, _ = placed  # a FileSpec with no settings: model key and epochs only
    assert rows["loose"].cells["20 epochs"].run_id == ids["loose"]
    assert rows["loose"].apart["20 epochs"].run_id == ids["loose_short"]


def test_the_best_sweep_trial_is_the_best_of_those_on_whole_data(placed) -> None:
    rows, ids, _, _ = placed
    row = rows["sw"]
    assert row.cells[SWEEP].run_id == ids["trial_ok"]  # epochs are searched: 7 is fine
    assert row.apart[SWEEP].run_id == ids["trial_cut"] and "dataset.max_eval=2" in row.apart[SWEEP].why
    assert row.sweep is not None and row.sweep[2] == "s9"
    dumped = {r["row"]: r for r in as_dict(list(rows.values()))}
    assert dumped["sw"]["apart"][SWEEP]["reduced"] is True


def test_reading_runs_is_tracked(placed) -> None:
    assert placed[3] == ["report: reading runs"]
