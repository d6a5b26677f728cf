"""Sweep parent runs and trial child runs on an MLflow tracking server.

One MLflow experiment per experiment name; one parent run per sweep (`segtune.kind=sweep`);
one child run per trial, found again by its `segtune.trial_id` tag, so a retried or resumed
trial reattaches to its run instead of opening a second one. Metrics are buffered and sent
with `log_batch` at epoch end: one request per epoch, not one per value.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tracking.artifacts import write_manifest

SWEEP_ID = "segtune.sweep_id"
TRIAL_ID = "segtune.trial_id"
KIND = "segtune.kind"
PRUNED = "segtune.pruned"
# MLflow's limits per log_batch request.
_MAX_PARAMS, _MAX_METRICS = 100, 1000


def quiet_mlflow() -> None:
    """segtune prints its own summary lines; MLflow's run links, info logs and progress bars repeat them."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if it does not exist."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def _params(params: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of MLflow's maximum size."""
    items = _params(params)
    for i in range(0, len(items), _MAX_PARAMS):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])


def start_sweep_run(uri: str, experiment: str, sweep_id: str, params: dict[str, Any],
                    tags: dict[str, str]) -> str:
    """Open the sweep's parent run and return its id."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment), run_name=f"sweep-{sweep_id}",
                            tags={**tags, KIND: "sweep", SWEEP_ID: sweep_id})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def find_trial_run(client: MlflowClient, experiment_id_: str, sweep_id: str, trial_id: str) -> str | None:
    """The run already opened for this trial of this sweep, if any."""
    runs = client.search_runs([experiment_id_], filter_string=(
        f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{TRIAL_ID}` = '{trial_id}'"), max_results=2)
    return runs[0].info.run_id if runs else None


class TrialRun:
    """A trial's child run: buffered metrics, checkpoint artifacts, a final status."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self._pending: list[Metric] = []

    @classmethod
    def open(cls, uri: str, experiment: str, *, sweep_id: str, trial_id: str, parent_run_id: str | None,
             params: dict[str, Any], tags: dict[str, str]) -> "TrialRun":
        """Open the trial's run, or reattach to the one it already has (a retry or resume)."""
        client = MlflowClient(uri)
        exp_id = experiment_id(client, experiment)
        run_id = find_trial_run(client, exp_id, sweep_id, trial_id)
        all_tags = {**tags, KIND: "trial", SWEEP_ID: sweep_id, TRIAL_ID: trial_id, MLFLOW_RUN_NAME: trial_id}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id is None:
            run_id = client.create_run(exp_id, tags=all_tags).info.run_id
            log_params(client, run_id, params)
        else:
            client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_METRICS], self._pending[_MAX_METRICS:]
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_checkpoint(self, path: Path, artifact_path: str = "checkpoints/best") -> None:
        """Upload a checkpoint directory with a sha256 manifest of its files."""
        write_manifest(Path(path))
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)


def close_open_trials(uri: str, experiment: str, sweep_id: str, finished_ok: set[str]) -> dict[str, str]:
    """After a sweep: end every trial run still RUNNING, so none is left open.

    A trial the scheduler stopped early never reaches its last epoch; it ends FINISHED with
    `segtune.pruned=true`. A trial whose id is not in `finished_ok` ended in error: FAILED.
    Returns run id -> the status it was given.
    """
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    closed = {}
    for run in client.search_runs([exp.experiment_id], filter_string=(
            f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = 'trial' and attributes.status = 'RUNNING'")):
        trial_id = run.data.tags.get(TRIAL_ID, "")
        if trial_id in finished_ok:
            client.set_tag(run.info.run_id, PRUNED, "true")
            status = "FINISHED"
        else:
            status = "FAILED"
        client.set_terminated(run.info.run_id, status)
        closed[run.info.run_id] = status
    return closed


def trial_runs(uri: str, experiment: str, sweep_id: str | None = None) -> list[Any]:
    """Trial runs of a sweep (the latest sweep of the experiment when `sweep_id` is None)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    if sweep_id is None:
        sweeps = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND}` = 'sweep'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if not sweeps:
            return []
        sweep_id = sweeps[0].data.tags[SWEEP_ID]
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = 'trial'"),
        order_by=["attributes.start_time ASC"], max_results=1000)


def end_sweep_run(uri: str, run_id: str, summary: dict[str, Any], status: str = "FINISHED") -> None:
    """Record the best trial on the parent run and close it."""
    client = MlflowClient(uri)
    tags = [RunTag(f"segtune.best.{k}", str(v)) for k, v in summary.items()]
    if tags:
        client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status)
