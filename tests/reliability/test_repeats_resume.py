"""A sweep with repeats interrupted by Ctrl-C continues with --resume: members resume with their trial."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.reliability.harness import check_complete, start, wait_for_metric, write_experiment


@pytest.mark.chaos  # minutes of CPU: run by `make test-chaos` (and CI), beside the SIGKILL test
def test_ctrl_c_then_resume_completes_every_member_once(tmp_path, em_data, mlflow_server) -> None:
    uri, name = mlflow_server.uri, "resume-repeats"
    file = write_experiment(tmp_path, em_data, uri, name, samples=2, epochs=3, scheduler="fifo")
    raw = yaml.safe_load(file.read_text())
    raw["search"].update(repeats={"seeds": 2}, metric="val/dice_lcb", finalists=0)
    file.write_text(yaml.safe_dump(raw))
    proc = start(file, cwd=tmp_path)
    wait_for_metric(uri, name, proc, key="val/dice_lcb")  # a trial has aggregated its members' first epoch
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    members = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'member'")
    assert members and all(m.info.status != "RUNNING" for m in members)  # the driver closed them too

    resumed = subprocess.run([sys.executable, "-m", "segtune.cli", "sweep", str(file), "--resume"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    check_complete(uri, name, samples=2, epochs=3)
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'trial'")
    members = client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'member'")
    assert len(members) == 4  # reattached on resume, never opened twice
    for trial in trials:
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/dice_lcb")]
        assert sorted(steps) == [1, 2, 3]
        mine = [m for m in members if m.data.tags["mlflow.parentRunId"] == trial.info.run_id]
        assert sorted(m.data.tags["segtune.repeat"] for m in mine) == ["seed=0", "seed=1"]
        for m in mine:
            assert m.info.status == "FINISHED" and "test/iou" in m.data.metrics
            steps = [h.step for h in client.get_metric_history(m.info.run_id, "val/dice")]
            assert sorted(steps) == [1, 2, 3], steps
