"""Every tiny model family runs through the spine: a one-trial sweep (Ray Tune, MLflow) each.

The demo test covers sam and clipseg with three trials; here the other families, with their
own policies and prompts, each get a real sweep with one short trial.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import load_config
from tests.conftest import DEMO

FAMILIES = {
    "medsam": ["model.train=mask_decoder", "prompt.train=box", "prompt.eval=box"],
    "pasam": ["model.train=adapter", "prompt.train=k_points", "prompt.eval=center_point"],
    "sam": ["model.train=adapter"],
    "clipseg": ["model.train=full", "prompt.train=text", "prompt.eval=text", "prompt.text=dark organelle"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_trial_sweep_of_each_family(family: str, tmp_path, em_data, mlflow_server) -> None:
    cfg = load_config(DEMO, ["search.finalists=0",
        f"model.name={family}", *FAMILIES[family],
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=4", "dataset.max_eval=4",
        "search.num_samples=1", "search.max_concurrent=1", "search.scheduler=fifo",
        "search.space={train.epochs: {choice: [1]}}",
        f"search.storage_path={tmp_path / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=family-{family}",
    ])
    outcome = run_sweep(cfg, log=lambda _: None)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(f"family-{family}")
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`segtune.sweep_id` = '{outcome.sweep_id}' and tags.`segtune.kind` = 'trial'"))
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED", run.data.tags.get("segtune.error")
    assert run.data.tags["segtune.model"] == f"{family}_tiny"
    assert run.data.params["model.train"] == cfg.model.train
    assert 0.0 <= run.data.metrics["test/iou"] <= 1.0
