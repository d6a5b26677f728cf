"""A sweep in a subprocess that tests can interrupt, kill and resume, and checks on what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import DEMO


def write_experiment(tmp: Path, em_data: Path, uri: str, experiment: str, *, samples: int = 4, epochs: int = 3,
                     scheduler: str = "asha") -> Path:
    """The demo experiment made small and slow enough to interrupt: a file the CLI can run."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["name"] = experiment
    raw["dataset"].update(root=str(em_data), cache_dir=str(em_data / "cache"), max_train=16, max_eval=4)
    raw["search"].update(num_samples=samples, scheduler=scheduler, grace_period=1, max_concurrent=2, finalists=0,
                         storage_path=str(tmp / "ray"),
                         space={"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}, "train.epochs": {"choice": [epochs]}})
    raw["tracking"].update(uri=uri, experiment=experiment, spool_dir=str(tmp / "spool"))
    path = tmp / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(file: Path, *args: str, cwd: Path) -> subprocess.Popen:
    """`segtune sweep FILE ...` in its own process group, so a kill takes its Ray processes too."""
    return subprocess.Popen([sys.executable, "-m", "segtune.cli", "sweep", str(file), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=120)


def wait_for_metric(uri: str, experiment: str, proc: subprocess.Popen, key: str = "val/dice",
                    timeout: float = 300) -> None:
    """Block until some trial of the experiment has logged `key` (training is under way).

    A sweep that exits first, or is not that far within `timeout`, fails the test with the end
    of what it printed (it is stopped first).
    """
    client, deadline = MlflowClient(uri), time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        if exp and any(key in r.data.metrics for r in client.search_runs([exp.experiment_id])):
            return
        time.sleep(0.5)
    why = f"the sweep exited ({proc.returncode})" if proc.poll() is not None else f"not within {timeout} s"
    kill_group(proc)
    raise TimeoutError(f"no {key} logged in {experiment}: {why}; the sweep printed:\n{proc.stdout.read()[-4000:]}")


def trial_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # the sweep has not opened its experiment yet
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`segtune.kind` = 'trial'", max_results=1000)


def check_complete(uri: str, experiment: str, samples: int, epochs: int) -> None:
    """Every trial once, FINISHED, epochs logged 1..N once each, completed trials tested."""
    client = MlflowClient(uri)
    runs = trial_runs(uri, experiment)
    assert len(runs) == samples, [r.data.tags.get("segtune.trial_id") for r in runs]
    assert len({r.data.tags["segtune.trial_id"] for r in runs}) == samples
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags.get("segtune.trial_id"), r.info.status)
        for key in ("val/dice", "train/dice_loss"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert sorted(steps) == list(range(1, len(steps) + 1)), (key, steps)
        pruned = r.data.tags.get("segtune.pruned") == "true"
        if not pruned:
            assert len(steps) == epochs and "test/iou" in r.data.metrics
    sweeps = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                             filter_string="tags.`segtune.kind` = 'sweep'")]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
