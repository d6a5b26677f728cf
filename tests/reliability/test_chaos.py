"""Chaos: a sweep SIGKILLed at random moments, resumed each time, ends complete and unduplicated."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.reliability.harness import check_complete, kill_group, start, write_experiment

KILLS = 5


def sweep_exists(uri: str, name: str) -> bool:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return bool(exp and client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'sweep'"))


@pytest.mark.chaos
def test_sweep_survives_repeated_sigkill(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "chaos"
    samples, epochs = 4, 3
    file = write_experiment(tmp_path, em_data, uri, name, samples=samples, epochs=epochs)
    rng = random.Random(7)
    survived = 0
    for _ in range(KILLS):
        # Until a sweep run exists there is nothing to resume: start afresh.
        proc = start(file, *(["--resume"] if sweep_exists(uri, name) else []), cwd=tmp_path)
        # Anywhere from before Ray is up to mid-trial: the driver, Ray and trials die at once.
        time.sleep(rng.uniform(3.0, 14.0))
        if proc.poll() is None:
            kill_group(proc)
            survived += 1
        else:
            proc.wait()
    final = subprocess.run([sys.executable, "-m", "segtune.cli", "sweep", str(file),
                            *(["--resume"] if sweep_exists(uri, name) else [])],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert survived >= 3, "too few kills landed while the sweep ran; lengthen the trials"
    check_complete(uri, name, samples=samples, epochs=epochs)
    print(f"chaos: {survived} kills survived, 0 trials lost, 0 duplicate runs")
