"""Where a model fails (#17 item 3): a trial's per-image test table, its histogram, the worst-k
overlays and the boundary metrics, read back from a real MLflow server; the same files from a
`segtune eval` of the trial's checkpoint; and the config's refusals.

One tiny trial (1 epoch, 6 test samples, `eval.worst_k: 2`, both boundary metrics) serves every
assertion of the module.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.checkpoint import load_weights
from segtune.config import ExperimentConfig, flatten, load_config
from segtune.data import open_store
from segtune.errors import ConfigError
from segtune.loaders import make_loaders
from segtune.metrics import boundary_f1, dice, hd95, iou, masks_from_logits
from segtune.models import build_model
from segtune.prepare import prepare_data
from segtune.train import TrialContext, run_trial
from tests.conftest import DEMO
from tracking.runs import TrialRun

WORST_K = 2


@dataclass
class Trial:
    cfg: ExperimentConfig
    store: Path
    run_id: str
    workdir: Path
    rows: list[dict[str, str]]
    client: MlflowClient


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory, em_data: Path, mlflow_server) -> Trial:
    tmp = tmp_path_factory.mktemp("per-image")
    cfg = load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=6", "train.epochs=1", "train.batch_size=4",
        "eval.overlays=1", f"eval.worst_k={WORST_K}", "eval.metrics=[hd95, boundary_f1]",
        f"search.storage_path={tmp / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=per-image-{tmp.name}",
    ])
    store, _ = prepare_data(cfg, log=lambda _: None)
    tracker = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="none", trial_id="per-image",
                            parent_run_id=None, params=flatten(cfg), tags={})
    run_trial(cfg, TrialContext(store=store, workdir=tmp / "trial", tracker=tracker, log=lambda _: None))
    client = MlflowClient(cfg.tracking.uri)
    local = Path(client.download_artifacts(tracker.run_id, "per_image/test.csv", str(tmp / "dl")))
    with open(local, newline="") as f:
        rows = list(csv.DictReader(f))
    return Trial(cfg, store, tracker.run_id, tmp / "trial", rows, client)


def _test_indices(t: Trial) -> list[int]:
    _, _, test_dl, _ = make_loaders(t.cfg, t.store, lambda _: None)
    return sorted(int(i) for i in test_dl.dataset.indices)


def test_the_table_has_one_row_per_test_sample_named_as_in_the_store(trial: Trial) -> None:
    samples = open_store(trial.store).index["samples"]
    assert [int(r["sample"]) for r in trial.rows] == _test_indices(trial) and len(trial.rows) == 6
    for row in trial.rows:
        stored = samples[int(row["sample"])]
        assert stored["split"] == "test"
        assert (row["source"], row["slice"], row["y"], row["x"], row["class"]) == tuple(
            "" if stored[k] is None else str(stored[k]) for k in ("source", "slice", "y", "x", "class"))
        assert 0.0 <= float(row["foreground"]) <= 1.0 and 0.0 <= float(row["predicted"]) <= 1.0
        assert float(row["foreground"]) > 0  # random_point prompts: samples with foreground only


def test_the_rows_average_to_the_logged_test_metrics(trial: Trial) -> None:
    metrics = trial.client.get_run(trial.run_id).data.metrics
    for key in ("iou", "dice", "hd95", "boundary_f1"):
        mean = sum(float(r[key]) for r in trial.rows) / len(trial.rows)
        assert metrics[f"test/{key}"] == pytest.approx(mean, rel=1e-6, abs=1e-6), key


def test_the_rows_are_the_metric_functions_on_the_best_checkpoints_masks(trial: Trial) -> None:
    model = build_model(trial.cfg.model)
    load_weights(trial.workdir / "checkpoints" / "best", model)
    model.eval()
    _, _, test_dl, _ = make_loaders(trial.cfg, trial.store, lambda _: None)
    by_sample = {int(r["sample"]): r for r in trial.rows}
    with torch.no_grad():
        for batch in test_dl:
            pred = masks_from_logits(model(batch["image"], batch["prompts"]))
            target = batch["mask"] > 0.5
            for name, fn in (("iou", iou), ("dice", dice), ("hd95", hd95), ("boundary_f1", boundary_f1)):
                for sample, value in zip(batch["index"].tolist(), fn(pred, target).tolist(), strict=True):
                    assert float(by_sample[sample][name]) == pytest.approx(value, abs=1e-5), (name, sample)


def test_the_histogram_and_the_log_table_json_are_on_the_run(trial: Trial, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    names = {Path(a.path).name for a in trial.client.list_artifacts(trial.run_id, "per_image")}
    assert names == {"test.csv", "test.json", "test_histogram.png", "test_worst"}
    png = trial.client.download_artifacts(trial.run_id, "per_image/test_histogram.png", str(tmp_path))
    assert Image.open(png).size[0] > 400
    # Listed as mlflow.log_table lists a table, so MLflow's own reader finds it.
    tags = trial.client.get_run(trial.run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "per_image/test.json", "type": "table"}]
    experiment = trial.client.get_run(trial.run_id).info.experiment_id
    # load_table searches runs through mlflow's fluent API, which reads the process's tracking URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trial.cfg.tracking.uri)
    table = trial.client.load_table(experiment, "per_image/test.json", run_ids=[trial.run_id])
    assert table["sample"].tolist() == [int(r["sample"]) for r in trial.rows]
    assert table["iou"].tolist() == pytest.approx([float(r["iou"]) for r in trial.rows])
    assert "segtune.overlay_error" not in tags


def test_the_worst_overlays_are_the_lowest_iou_rows(trial: Trial, tmp_path: Path) -> None:
    pngs = sorted(Path(a.path).name for a in trial.client.list_artifacts(trial.run_id, "per_image/test_worst"))
    ranked = sorted(trial.rows, key=lambda r: (float(r["iou"]), int(r["sample"])))[:WORST_K]
    assert pngs == [f"worst_{i:02d}_sample_{r['sample']}.png" for i, r in enumerate(ranked)]
    local = trial.client.download_artifacts(trial.run_id, f"per_image/test_worst/{pngs[0]}", str(tmp_path))
    assert Image.open(local).size == (3 * 256, 256)
    # The fixed first-N overlays are still there beside them.
    assert [a.path for a in trial.client.list_artifacts(trial.run_id, "overlays") if a.path.endswith(".png")] == [
        "overlays/overlay_00.png"]


def test_an_evaluation_of_the_checkpoint_logs_the_same_table(trial: Trial, tmp_path: Path) -> None:
    from segtune.config import apply_params
    from segtune.evaluate import evaluate_checkpoint

    # eval.sample: 6 picks the samples dataset.max_eval: 6 gave the trial's test loader.
    cfg = apply_params(trial.cfg, {"eval.sample": 6})
    result = evaluate_checkpoint(cfg, checkpoint=trial.workdir / "checkpoints" / "best", log=lambda _: None)
    local = trial.client.download_artifacts(result.run_id, "per_image/test.csv", str(tmp_path))
    with open(local, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["sample"] for r in rows] == [r["sample"] for r in trial.rows]
    by_sample = {r["sample"]: r for r in rows}
    for row in trial.rows:
        for key in ("iou", "dice", "hd95", "boundary_f1"):
            assert float(by_sample[row["sample"]][key]) == pytest.approx(float(row[key]), abs=1e-5)
    assert result.metrics["test/hd95"] == pytest.approx(sum(float(r["hd95"]) for r in rows) / len(rows), abs=1e-5)
    worst = [a.path for a in trial.client.list_artifacts(result.run_id, "per_image/test_worst")]
    assert len(worst) == WORST_K


@pytest.mark.parametrize("override, field", [("eval.worst_k=-1", "eval.worst_k"),
                                              ("eval.metrics=[foo]", "eval.metrics"),
                                              ("eval.metrics=[hd95, hd95]", "eval.metrics")])
def test_config_errors_at_load(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(DEMO, [override])
