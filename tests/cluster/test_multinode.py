"""A sweep on a real two-node Ray cluster (token auth on), and what preflight refuses there.

The cluster (tests/cluster/conftest.py) is a head and a worker of 1 CPU each, so the two trials
that run at once must run on different nodes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from segtune.config import ExperimentConfig, load_config
from segtune.errors import ClusterError
from tests.conftest import DEMO


def cluster_config(tmp: Path, em_data: Path, uri: str, experiment: str, *extra: str) -> ExperimentConfig:
    """The demo experiment shrunk as in tests/test_sweep.py: 4 short trials, 2 at a time."""
    return load_config(DEMO, ["search.finalists=0",
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=4",
        "search.num_samples=4", "search.max_concurrent=2", "search.grace_period=1",
        "search.space.train.epochs={randint: [1, 2]}", "search.space.train.batch_size={choice: [4, 8]}",
        f"search.storage_path={tmp / 'ray'}",
        f"tracking.uri={uri}", f"tracking.experiment={experiment}", *extra,
    ])


def runs_of(uri: str, experiment: str, sweep_id: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    where = f"tags.`segtune.sweep_id` = '{sweep_id}'" if sweep_id else ""
    return client.search_runs([exp.experiment_id], filter_string=where)


def test_trials_run_on_both_nodes_and_finish(cluster_env, tmp_path, em_data, mlflow_server) -> None:
    cfg = cluster_config(tmp_path, em_data, mlflow_server.uri, "cluster-multinode")
    outcome = run_sweep(cfg, address=cluster_env.address, log=lambda _: None)

    runs = runs_of(mlflow_server.uri, "cluster-multinode", outcome.sweep_id)
    parents = [r for r in runs if r.data.tags["segtune.kind"] == "sweep"]
    trials = [r for r in runs if r.data.tags["segtune.kind"] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4
    assert all(r.info.status == "FINISHED" for r in trials), [r.info.status for r in trials]
    nodes = {r.data.tags["segtune.node"] for r in trials}
    assert len(nodes) == 2, f"trials ran on {nodes}; expected the head and the worker node"


@pytest.mark.parametrize("resources, needle", [
    (["resources.gpu=1"], "1 GPU"),
    (["resources.cpu=2"], "2 CPU"),
])
def test_a_trial_larger_than_every_node_is_refused(resources, needle, cluster_env, tmp_path, em_data,
                                                   mlflow_server) -> None:
    experiment = f"cluster-refused-{tmp_path.name}"
    cfg = cluster_config(tmp_path, em_data, mlflow_server.uri, experiment, *resources)
    with pytest.raises(ClusterError) as err:
        run_sweep(cfg, address=cluster_env.address, log=lambda _: None)
    message = str(err.value)
    # The message names the request and lists the cluster's nodes with what they have.
    assert needle in message and "1 CPU, 0 GPU" in message and message.count("node ") >= 2
    assert runs_of(mlflow_server.uri, experiment) == [], "a refused sweep must open no run"


@pytest.mark.parametrize("field", ["search.storage_path", "tracking.spool_dir"])
def test_local_storage_a_node_cannot_see_is_refused(field, cluster_env, tmp_path, em_data, mlflow_server) -> None:
    if cluster_env.blind_dir is None:
        pytest.skip(f"no storage-blind node on this machine: {cluster_env.blind_skip_reason}")
    storage = cluster_env.blind_dir / f"{field.split('.')[1]}-{tmp_path.name}"
    experiment = f"cluster-storage-{tmp_path.name}"
    cfg = cluster_config(tmp_path, em_data, mlflow_server.uri, experiment, f"{field}={storage}")
    with pytest.raises(ClusterError, match="every node sees") as err:
        run_sweep(cfg, address=cluster_env.address, log=lambda _: None)
    assert str(storage) in str(err.value) and field in str(err.value)
    assert runs_of(mlflow_server.uri, experiment) == []


def test_a_driver_without_the_cluster_token_is_refused(ray_cluster, tmp_path, em_data, mlflow_server) -> None:
    """`segtune sweep --address` from a shell holding another token: one clear error, no traceback."""
    bad = tmp_path / "other_token"
    bad.write_text("not-the-cluster-token")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(bad),
           # Ray retries the GCS 20 times, a second apart, before it gives up; 2 are enough here.
           "RAY_NUM_REDIS_GET_RETRIES": "2"}
    res = subprocess.run(
        [sys.executable, "-m", "segtune.cli", "sweep", str(DEMO), "--address", ray_cluster.address,
         "--tracking-uri", mlflow_server.uri, "--set", f"dataset.root={em_data}",
         "--set", f"dataset.cache_dir={em_data / 'cache'}", "--set", f"search.storage_path={tmp_path / 'ray'}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "InvalidAuthToken" in res.stderr and "RAY_AUTH_TOKEN_PATH" in res.stderr
    assert "Traceback" not in res.stderr


GPU_NODE = {"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.5", "Resources": {"CPU": 8.0, "GPU": 1.0}}
CPU_NODE = {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.6", "Resources": {"CPU": 32.0}}


@pytest.mark.parametrize("cpu, gpu, workers, fits", [
    (2, 0, 2, True),      # one CPU per worker
    (16, 2, 2, False),    # two workers of 8 CPU + 1 GPU: only the GPU node holds one
    (8, 1, 1, True),
    (32, 0, 2, True),     # 16 CPU each: both on the 32-CPU node
    (64, 0, 4, False),    # 16 CPU each: two fit on the 32-CPU node, none on the 8-CPU one
])
def test_a_multi_worker_trial_must_fit_across_the_nodes(cpu, gpu, workers, fits) -> None:
    from segtune.cluster import check_fits

    if fits:
        check_fits(cpu, gpu, [GPU_NODE, CPU_NODE], "the cluster", workers)
    else:
        with pytest.raises(ClusterError, match=f"runs {workers} workers of {cpu / workers:g} CPU"):
            check_fits(cpu, gpu, [GPU_NODE, CPU_NODE], "the cluster", workers)


@pytest.mark.parametrize("cpu, gpu, fits", [
    (1, 0.25, True),   # a fractional GPU shares the node's one GPU
    (8, 1, True),
    (9, 1, False),     # the CPUs and the GPU must be on the same node
    (1, 2, False),
    (32, 0, True),
])
def test_a_trial_must_fit_on_one_node(cpu, gpu, fits) -> None:
    from segtune.cluster import check_fits

    if fits:
        check_fits(cpu, gpu, [GPU_NODE, CPU_NODE], "the cluster")
    else:
        with pytest.raises(ClusterError, match="10.0.0.5: 8 CPU, 1 GPU; node bbbbbbbb at 10.0.0.6: 32 CPU, 0 GPU"):
            check_fits(cpu, gpu, [GPU_NODE, CPU_NODE], "the cluster")
