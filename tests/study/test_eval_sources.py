"""`segtune eval` scores a trained checkpoint from a folder, a run and a promoted model alike.

The twin `qata_sam_e20_tiny` was trained by the package fixture; its trial scored its test
split with the best checkpoint. Scoring that checkpoint again, whichever way it is found,
must give the same test IoU: same weights, same samples, same seeded prompts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.errors import CheckpointError, ConfigError
from segtune.evaluate import evaluate_checkpoint
from segtune.promotion import promote
from tests.study.conftest import THESIS, twin_config

NAME = "qata_sam_e20_tiny"
FILE = THESIS / "tiny" / f"{NAME}.yaml"


@pytest.fixture(scope="module")
def trained(twin_runs):
    """(config, trial run id, trial test/iou) of the trained twin."""
    client = MlflowClient(twin_runs.uri)
    exp = client.get_experiment_by_name(twin_runs.experiment)
    run = client.search_runs([exp.experiment_id], filter_string=(
        f"params.name = '{NAME}' and tags.`segtune.kind` = 'trial' and tags.`segtune.sweep_id` = 'none'"))[0]
    return twin_config(FILE, twin_runs.root, twin_runs.uri), run.info.run_id, run.data.metrics["test/iou"]


# The trial scored its test split from the embedding cache (fp16, segtune.cache); eval runs the
# encoder in fp32. The two agree to fp16 precision, not bit for bit.
CACHE_TOL = dict(rel=1e-3, abs=1e-4)


def _eval_run(uri: str, run_id: str):
    return MlflowClient(uri).get_run(run_id)


def test_checkpoint_folder_and_run_give_the_trials_test_score(trained, twin_runs) -> None:
    cfg, run_id, test_iou = trained
    folder = evaluate_checkpoint(cfg, checkpoint=twin_runs.workdirs[NAME] / "checkpoints" / "best", log=lambda _: None)
    by_run = evaluate_checkpoint(cfg, run_id=run_id, log=lambda _: None)
    assert folder.metrics["test/iou"] == pytest.approx(test_iou, **CACHE_TOL)
    assert by_run.metrics["test/iou"] == pytest.approx(test_iou, **CACHE_TOL)
    run = _eval_run(cfg.tracking.uri, by_run.run_id)
    assert run.data.tags["segtune.kind"] == "eval" and run.info.status == "FINISHED"
    assert run.data.tags["segtune.source"] == f"runs:/{run_id}" and run.data.tags["segtune.source_run"] == run_id
    assert run.data.metrics["test/iou"] == pytest.approx(test_iou, **CACHE_TOL)


def test_promoted_model_is_scored_through_the_cli(trained, tmp_path: Path) -> None:
    cfg, run_id, test_iou = trained
    p = promote(cfg.tracking.uri, cfg.tracking.experiment, run_id=run_id, approve=True, reason="test",
                log=lambda _: None)
    assert p.name == "segtune-sam_tiny-synthetic_qata" and p.approved
    uri = f"models:/{p.name}@champion"
    res = subprocess.run([sys.executable, "-m", "segtune.cli", "eval", str(FILE), "--model", uri,
                          "--tracking-uri", cfg.tracking.uri, "--split", "test",
                          "--set", f"dataset.root={cfg.dataset.root}", "--set", f"dataset.cache_dir={cfg.dataset.cache_dir}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint {uri}" in res.stdout
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`segtune.source` = '{uri}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["segtune.kind"] == "eval" and run.data.tags["segtune.source_run"] == run_id
    assert run.data.metrics["test/iou"] == pytest.approx(test_iou, **CACHE_TOL)
    assert run.data.params["model.variant"] == "tiny"  # the checkpoint's model, logged as scored


def test_exactly_one_source_and_clear_errors(trained, twin_runs) -> None:
    cfg, run_id, _ = trained
    with pytest.raises(CheckpointError, match="exactly one"):
        evaluate_checkpoint(cfg, checkpoint=Path("x"), run_id=run_id, log=lambda _: None)
    with pytest.raises(CheckpointError, match="no such folder"):
        evaluate_checkpoint(cfg, checkpoint=twin_runs.root / "absent", log=lambda _: None)
    zero_shot_run = twin_runs.zero_shot["qata_medsam_tiny"].run_id  # a run that trained nothing
    with pytest.raises(CheckpointError, match="checkpoints/best"):
        evaluate_checkpoint(cfg, run_id=zero_shot_run, log=lambda _: None)
    with pytest.raises(CheckpointError, match="models:/"):
        evaluate_checkpoint(cfg, model_uri="runs:/abc/model", log=lambda _: None)
    from segtune.study_cli import eval_command

    with pytest.raises(ConfigError, match="exactly one"):
        eval_command(FILE, zero_shot=True, checkpoint=None, run=run_id, model=None, split=None,
                     tracking_uri=None, set_=None, show_config=False)
