"""Multi-worker trials: a Ray Train TorchTrainer of 2 gloo workers inside each Tune trial.

One real sweep on the local Ray (2 CPUs): two trials of 2 workers each, one at a time, on the
embedding-cache path (`mask_decoder`). The second trial can only start once the first one's
workers are released, so the sweep finishing at all is part of what is tested.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import load_config
from tests.conftest import DEMO
from tracking.artifacts import sha256_file


@pytest.fixture(scope="module")
def dp_sweep(tmp_path_factory, em_data, mlflow_server):
    tmp = tmp_path_factory.mktemp("dp")
    cfg = load_config(DEMO, ["search.finalists=0",
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=6", "model.train=mask_decoder",
        "search.num_samples=2", "search.max_concurrent=1", "search.grace_period=1",
        "search.space.train.epochs={choice: [2]}", "search.space.train.batch_size={choice: [2]}",
        "resources.cpu=2", "resources.workers=2",
        f"search.storage_path={tmp / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=data-parallel",
    ])
    lines: list[str] = []
    return cfg, run_sweep(cfg, log=lines.append), lines


def trial_runs(cfg, sweep_id):
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`segtune.sweep_id` = '{sweep_id}'")
    return client, [r for r in runs if r.data.tags["segtune.kind"] == "trial"]


@pytest.mark.timeout(420)
def test_each_trial_logs_once_from_rank_zero_and_finishes(dp_sweep) -> None:
    cfg, outcome, lines = dp_sweep
    client, runs = trial_runs(cfg, outcome.sweep_id)
    # Rank 1 opened no run of its own: one run per trial, each complete.
    assert len(runs) == 2, [r.data.tags.get("segtune.trial_id") for r in runs]
    assert len({r.data.tags["segtune.trial_id"] for r in runs}) == 2
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.status, r.data.tags.get("segtune.error"))
        assert r.data.tags["segtune.workers"] == "2"
        for key in ("train/dice_loss", "val/dice"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, key)] == [1, 2]
        assert 0.0 <= r.data.metrics["test/iou"] <= 1.0
        assert client.list_artifacts(r.info.run_id, "checkpoints/best")
    assert sum("completed" in line for line in lines) == 2, lines


@pytest.mark.timeout(420)
def test_the_workers_weights_stay_equal_and_rank_zero_checkpoints_to_storage(dp_sweep) -> None:
    cfg, outcome, _ = dp_sweep
    _, runs = trial_runs(cfg, outcome.sweep_id)
    for r in runs:
        trial = r.data.tags["segtune.trial_id"]
        ranks = [Path(tempfile.gettempdir()) / "segtune-train" / f"{outcome.sweep_id}-{trial}-rank{k}" for k in (0, 1)]
        # Each rank saw a different half of every batch; DDP averaged their gradients, so after
        # two epochs of Adam steps the two copies of the decoder are still the same weights:
        # each rank logs its final weights' sha256 before it drops its local checkpoints.
        digests = [[line.split()[-1] for line in (r / "trial.log").read_text().splitlines()
                    if line.startswith("final weights sha256 ")] for r in ranks]
        assert len(digests[0]) == 1 and digests[0] == digests[1], digests
        assert not any((r / "checkpoints").exists() for r in ranks)  # no working copies left in /tmp
        # Ray Train kept rank 0's checkpoints on the sweep's storage, where a retry finds them.
        kept = list((Path(cfg.search.storage_path) / f"{cfg.name}-{outcome.sweep_id}" / "train" / trial).glob("checkpoint_2*"))
        assert kept and all((k / "model.safetensors").is_file() for k in kept)
        assert digests[0][0] in {sha256_file(k / "model.safetensors") for k in kept}  # the last one reported
