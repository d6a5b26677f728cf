"""Interrupted sweeps continue with --resume: nothing re-run, nothing duplicated, nothing left open."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.reliability.harness import (
    check_complete,
    kill_group,
    start,
    trial_runs,
    wait_for_metric,
    write_experiment,
)

# Sweeps interrupted and resumed take minutes of CPU each: `make test-chaos` (CI runs it too).
pytestmark = pytest.mark.chaos


def test_ctrl_c_saves_state_marks_runs_killed_and_resume_finishes(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "resume-ctrl-c"
    file = write_experiment(tmp_path, em_data, uri, name, samples=3, epochs=4, scheduler="fifo")
    proc = start(file, cwd=tmp_path)
    wait_for_metric(uri, name, proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the driver
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:]
    assert "--resume" in out
    runs = trial_runs(uri, name)
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert any(r.info.status == "KILLED" for r in runs), [r.info.status for r in runs]
    done_before = {r.info.run_id for r in runs if r.info.status == "FINISHED"}

    resumed = subprocess.run([sys.executable, "-m", "segtune.cli", "sweep", str(file), "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    check_complete(uri, name, samples=3, epochs=4)
    client = MlflowClient(uri)
    for run_id in done_before:  # finished trials were not run again
        assert len(client.get_metric_history(run_id, "val/dice")) == 4


def test_resume_with_a_changed_search_space_is_refused(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "resume-changed"
    file = write_experiment(tmp_path, em_data, uri, name, samples=2, epochs=2)
    proc = start(file, cwd=tmp_path)
    wait_for_metric(uri, name, proc)
    kill_group(proc)
    res = subprocess.run([sys.executable, "-m", "segtune.cli", "sweep", str(file), "--resume",
                          "--set", "search.num_samples=5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "changed" in res.stderr and "Traceback" not in res.stderr


def test_resume_from_the_sweep_folder(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "resume-folder"
    file = write_experiment(tmp_path, em_data, uri, name, samples=2, epochs=3, scheduler="fifo")
    proc = start(file, cwd=tmp_path)
    wait_for_metric(uri, name, proc)
    kill_group(proc)  # SIGKILL: no chance to save anything or close runs
    folder = next((tmp_path / "ray").glob(f"{name}-*"))
    res = subprocess.run([sys.executable, "-m", "segtune.cli", "sweep", str(folder), "--resume"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_complete(uri, name, samples=2, epochs=3)
