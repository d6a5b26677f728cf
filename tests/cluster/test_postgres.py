"""MLflow for a team: PostgreSQL runs, S3 artifacts, many trials writing at once.

`team_server` is infra/mlflow/mlflow-server.sh on a private PostgreSQL (tests/cluster/pg.py)
with its artifacts proxied into the moto bucket. A 4-trial sweep runs 2 trials at a time on the
two-node Ray cluster; every metric point Tune saw must be in MLflow. The same writer and
experiment-creation races also run against the SQLite server that the demo uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from segtune.commands import run_sweep
from tests.cluster.conftest import REPO, S3Server, free_port
from tests.cluster.pg import Postgres, find_pg_bin, start_postgres
from tests.cluster.test_multinode import cluster_config, runs_of
from tracking.runs import experiment_id

MLFLOW_SH = REPO / "infra" / "mlflow" / "mlflow-server.sh"
PER_EPOCH = ("train/dice_loss", "val/dice", "val/iou")
WRITERS, STEPS = 4, 25


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        reason = ("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install -y postgresql; "
                  ".ci/run does this)")
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    pg = start_postgres(bin_dir, free_port())
    try:
        pg.createdb("mlflow")
        yield pg
    finally:
        pg.stop()


@dataclass
class TeamServer:
    uri: str
    artifacts_prefix: str


@pytest.fixture(scope="module")
def team_server(postgres: Postgres, s3_server: S3Server, tmp_path_factory) -> Iterator[TeamServer]:
    home = tmp_path_factory.mktemp("mlflow-team")
    port = free_port()
    env = {**os.environ, **s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    prefix = "mlartifacts"
    res = subprocess.run([str(MLFLOW_SH), "start", "--home", str(home), "--port", str(port), "--workers", "2",
                          "--backend-store-uri", postgres.uri("mlflow"),
                          "--artifacts-destination", f"s3://{s3_server.bucket}/{prefix}"],
                         env=env, capture_output=True, text=True, timeout=180)
    try:
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        yield TeamServer(f"http://127.0.0.1:{port}", prefix)
    finally:
        subprocess.run([str(MLFLOW_SH), "stop", "--home", str(home)], env=env, timeout=60)


def tune_results(experiment_dir: Path) -> dict[str, list[dict]]:
    """Trial id -> every result the trial reported to Tune, from Tune's result.json files."""
    out = {}
    for f in experiment_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


def test_concurrent_trials_lose_no_metric_point(cluster_env, team_server, s3_server, tmp_path, em_data) -> None:
    cfg = cluster_config(tmp_path, em_data, team_server.uri, "team-sweep")
    outcome = run_sweep(cfg, address=cluster_env.address, log=lambda _: None)

    client = MlflowClient(team_server.uri)
    assert len(client.search_experiments(filter_string="name = 'team-sweep'")) == 1
    trials = {r.data.tags["segtune.trial_id"]: r for r in runs_of(team_server.uri, "team-sweep", outcome.sweep_id)
              if r.data.tags["segtune.kind"] == "trial"}
    reported = tune_results(tmp_path / "ray" / f"{cfg.name}-{outcome.sweep_id}")
    assert set(trials) == set(reported) and len(trials) == 4
    assert len({r.data.tags["segtune.node"] for r in trials.values()}) == 2  # two trials wrote at once

    for trial_id, rows in reported.items():
        run = trials[trial_id]
        assert run.info.status == "FINISHED"
        for key in PER_EPOCH:
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert history == {r["epoch"]: r[key] for r in rows}, (trial_id, key)
        final = rows[-1]
        if "test/iou" in final:  # completed, not pruned: its test scores arrived at its last step
            for key in ("test/iou", "test/dice"):
                [point] = client.get_metric_history(run.info.run_id, key)
                assert (point.step, point.value) == (final["epoch"], final[key])

    # Checkpoints went through the server into the bucket; the trials held no bucket keys.
    assert any(k.endswith("model.safetensors") for k in s3_server.keys(team_server.artifacts_prefix + "/"))


@pytest.fixture(params=["sqlite", "postgres"])
def server_uri(request) -> str:
    """The demo's SQLite server and the team server on PostgreSQL, in turn."""
    if request.param == "sqlite":
        return request.getfixturevalue("mlflow_server").uri
    return request.getfixturevalue("team_server").uri


def run_together(n: int, work) -> list:
    """Call work(i) in n threads released at once; re-raise the first error."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def test_trials_racing_to_create_the_experiment_get_one(server_uri, tmp_path) -> None:
    name = f"race-{tmp_path.name}"
    ids = run_together(WRITERS, lambda _: experiment_id(MlflowClient(server_uri), name))
    assert len(set(ids)) == 1
    assert len(MlflowClient(server_uri).search_experiments(filter_string=f"name = '{name}'")) == 1


def test_concurrent_writers_lose_no_write(server_uri, tmp_path) -> None:
    """4 writers, one run each, one log_batch per 'epoch' as trials do: every point is stored."""
    client = MlflowClient(server_uri)
    exp = experiment_id(client, f"writers-{tmp_path.name}")
    runs = [client.create_run(exp).info.run_id for _ in range(WRITERS)]

    def write(i: int) -> None:
        own = MlflowClient(server_uri)
        for step in range(1, STEPS + 1):
            own.log_batch(runs[i], metrics=[Metric(k, i + step / 100, 0, step) for k in PER_EPOCH])
        own.set_terminated(runs[i])

    run_together(WRITERS, write)
    for i, run_id in enumerate(runs):
        for key in PER_EPOCH:
            history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            assert history == {s: i + s / 100 for s in range(1, STEPS + 1)}, (i, key)
        assert client.get_run(run_id).info.status == "FINISHED"
