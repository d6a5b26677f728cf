"""Trials that fail: a NaN loss ends its run FAILED with the reason; a killed worker is retried."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.reliability.harness import check_complete, start, trial_runs, write_experiment


def test_nan_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "nan-trial"
    file = write_experiment(tmp_path, em_data, uri, name, samples=3, epochs=2, scheduler="fifo")
    raw = yaml.safe_load(file.read_text())
    raw["search"]["space"]["train.lr"] = {"choice": [1.0e30, 1.0e-3]}  # 1e30 turns the loss to NaN
    raw["search"]["max_failures"] = 0
    file.write_text(yaml.safe_dump(raw))
    proc = start(file, cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    runs = trial_runs(uri, name)
    assert len(runs) == 3
    failed = [r for r in runs if float(r.data.params["train.lr"]) > 1]
    finished = [r for r in runs if float(r.data.params["train.lr"]) < 1]
    assert failed and finished, "the seeded sampler should try both learning rates"
    for r in failed:
        assert r.info.status == "FAILED"
        assert "loss became nan" in r.data.tags["segtune.error"]
    for r in finished:
        assert r.info.status == "FINISHED" and "test/iou" in r.data.metrics


def test_a_sweep_whose_every_trial_failed_exits_2_with_the_table(tmp_path, em_data, mlflow_server) -> None:
    """Automation (a pipeline, a Slurm script) must tell a failed sweep from a good one."""
    uri, name = mlflow_server.uri, "all-failed"
    file = write_experiment(tmp_path, em_data, uri, name, samples=2, epochs=1, scheduler="fifo")
    raw = yaml.safe_load(file.read_text())
    raw["search"]["space"]["train.lr"] = {"choice": [1.0e30]}  # every trial's loss turns to NaN
    raw["search"]["max_failures"] = 0
    file.write_text(yaml.safe_dump(raw))
    proc = start(file, cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "no trial ended with a result (2 of 2 failed" in out.strip().splitlines()[-1], out[-3000:]
    assert "2 trials" in out  # the table is still printed
    exp = MlflowClient(uri).get_experiment_by_name(name)
    assert f"runs: {uri}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in out
    assert {r.info.status for r in trial_runs(uri, name)} == {"FAILED"}


@pytest.mark.chaos  # a worker SIGKILLed mid-trial and retried: `make test-chaos` (CI runs it too)
def test_killed_trial_worker_is_retried_from_its_last_checkpoint(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "retry-trial"
    file = write_experiment(tmp_path, em_data, uri, name, samples=1, epochs=8, scheduler="fifo")
    proc = start(file, cwd=tmp_path)
    client = MlflowClient(uri)
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for two epochs, so a checkpoint exists
        runs = trial_runs(uri, name)
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val/dice")) >= 2:
            break
        time.sleep(0.5)
    run = trial_runs(uri, name)[0]
    first_pid = int(run.data.tags["segtune.pid"])
    os.kill(first_pid, signal.SIGKILL)  # the trial's Ray worker, not the driver
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    check_complete(uri, name, samples=1, epochs=8)
    run = client.get_run(run.info.run_id)
    assert int(run.data.tags["segtune.pid"]) != first_pid
    assert int(run.data.tags["segtune.resumed_from_epoch"]) >= 2


@pytest.mark.chaos
def test_killed_rank_zero_of_a_multi_worker_trial_resumes_from_ray_trains_checkpoint(tmp_path, em_data,
                                                                                    mlflow_server) -> None:
    """A data-parallel trial (2 gloo workers) whose rank 0 dies: Tune retries the trial, and its new
    TorchTrainer finds the checkpoints rank 0 reported under the sweep's storage."""
    uri, name = mlflow_server.uri, "retry-multi-worker"
    file = write_experiment(tmp_path, em_data, uri, name, samples=1, epochs=6, scheduler="fifo")
    raw = yaml.safe_load(file.read_text())
    raw["resources"] = {"cpu": 2, "workers": 2}
    file.write_text(yaml.safe_dump(raw))
    proc = start(file, cwd=tmp_path)
    client = MlflowClient(uri)
    deadline = time.time() + 300
    # Ray Train's controller takes in a reported checkpoint when it next polls the workers, a
    # couple of seconds later; with one-second epochs it may be an epoch or two behind the log.
    while time.time() < deadline:
        runs = trial_runs(uri, name)
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val/dice")) >= 3:
            break
        time.sleep(0.5)
    run = trial_runs(uri, name)[0]
    first_pid = int(run.data.tags["segtune.pid"])  # rank 0: the worker that logs
    os.kill(first_pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    check_complete(uri, name, samples=1, epochs=6)
    run = client.get_run(run.info.run_id)
    assert run.data.tags["segtune.workers"] == "2"
    assert int(run.data.tags["segtune.pid"]) != first_pid
    # Restored from a checkpoint Ray Train had taken in, not started again from epoch 1.
    assert int(run.data.tags["segtune.resumed_from_epoch"]) >= 1
