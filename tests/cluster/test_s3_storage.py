"""Tune storage on S3: a sweep on the two-node cluster whose checkpoints land in a bucket.

The bucket is on moto's S3-compatible server (tests/cluster/conftest.py). The driver and the
nodes have AWS_ENDPOINT_URL and keys in their environment, as they would for MinIO or Ceph.
"""

from __future__ import annotations

import pytest

from segtune.cluster import check_uri_storage, storage_uri
from segtune.commands import run_sweep
from segtune.errors import ClusterError
from tests.cluster.test_multinode import cluster_config, runs_of


def test_sweep_checkpoints_land_in_the_bucket(cluster_env, s3_server, tmp_path, em_data, mlflow_server) -> None:
    prefix = f"sweeps/{tmp_path.name}"
    cfg = cluster_config(tmp_path, em_data, mlflow_server.uri, "cluster-s3",
                         f"search.storage_path=s3://{s3_server.bucket}/{prefix}",
                         "search.num_samples=2", "search.space.train.epochs={choice: [1]}")
    outcome = run_sweep(cfg, address=cluster_env.address, log=lambda _: None)

    trials = [r for r in runs_of(mlflow_server.uri, "cluster-s3", outcome.sweep_id)
              if r.data.tags["segtune.kind"] == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)

    keys = s3_server.keys(f"{prefix}/{cfg.name}-{outcome.sweep_id}/")
    # Tune's experiment state, and per trial a checkpoint folder with the model's weights.
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in keys), keys[:20]
    for run in trials:
        trial_id = run.data.tags["segtune.trial_id"]
        weights = [k for k in keys if f"_{trial_id}_" in k and "/checkpoint_" in k and k.endswith("model.safetensors")]
        assert weights, f"no checkpoint of trial {trial_id} in the bucket; keys: {keys[:20]}"


def test_storage_uri_keeps_uris_and_resolves_paths(tmp_path, monkeypatch) -> None:
    """An S3 storage path stays a URI; it is not resolved into a local folder named 's3:'."""
    monkeypatch.chdir(tmp_path)
    assert storage_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert storage_uri("runs") == str(tmp_path / "runs")
    assert storage_uri(f"file://{tmp_path}/x") == str(tmp_path / "x")


def test_an_unreachable_bucket_is_refused_before_the_sweep(cluster_env) -> None:
    with pytest.raises(ClusterError, match="AWS_ENDPOINT_URL") as err:
        check_uri_storage("s3://segtune-no-such-bucket/sweeps")
    assert "segtune-no-such-bucket" in str(err.value)
