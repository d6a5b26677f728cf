"""Chaos: a sweep SIGKILLed at random moments, resumed each time, ends complete and unduplicated."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.reliability.harness import (
    check_complete,
    kill_group,
    start,
    trial_runs,
    write_experiment,
)

KILLS = 5


def sweep_exists(uri: str, name: str) -> bool:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return bool(exp and client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'sweep'"))


@pytest.mark.chaos
@pytest.mark.parametrize("members", [0, 2], ids=["trials", "members"])
def test_sweep_survives_repeated_sigkill(members: int, tmp_path, em_data, mlflow_server) -> None:
    """With `members`, 2 configurations of 2 seeds each (search.repeats): the same training as 4
    plain trials, killed the same way; every member runs and logs its epochs once too."""
    uri, name = mlflow_server.uri, f"chaos-{members}"
    samples, epochs = (2 if members else 4), 3
    file = write_experiment(tmp_path, em_data, uri, name, samples=samples, epochs=epochs)
    if members:
        raw = yaml.safe_load(file.read_text())
        raw["search"]["repeats"] = {"seeds": members}
        file.write_text(yaml.safe_dump(raw))
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
    if members:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name).experiment_id
        for trial in trial_runs(uri, name):
            mine = client.search_runs([exp], filter_string=(
                f"tags.`segtune.kind` = 'member' and tags.`mlflow.parentRunId` = '{trial.info.run_id}'"))
            assert len(mine) == members, [m.data.tags.get("segtune.member") for m in mine]
            for m in mine:
                assert m.info.status == "FINISHED", m.info.status
                steps = [h.step for h in client.get_metric_history(m.info.run_id, "val/dice")]
                assert sorted(steps) == list(range(1, len(steps) + 1)), steps
    print(f"chaos: {survived} kills survived, 0 trials lost, 0 duplicate runs")
