"""Runs that score without training: zero-shot, checkpoint evaluations, prompt searches.

They live beside the sweeps in the same MLflow experiment and carry the same tags
(`segtune.model`, `segtune.dataset`, `segtune.git_sha`, `segtune.data_hash`), with their own
`segtune.kind`:

- `zero_shot`: a model scored as built (official or random weights), no training;
- `eval`: a trained checkpoint scored (`segtune eval --checkpoint/--run/--model`),
  `segtune.source` naming where it came from;
- `prompt_search`: the parent of a prompt search, whose children are `zero_shot` runs tagged
  `segtune.search=prompt`. A kind of its own, not `sweep`, so `segtune runs` and `promote`,
  which take the latest `sweep`, never pick a prompt search.

Like trials, they are `tracking.runs.TrialRun`s: buffered metrics, a final status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tracking.redact import redact, secret_values
from tracking.runs import (
    KIND,
    SWEEP_ID,
    TRIAL_ID,
    UNREACHABLE,
    TrialRun,
    create_run,
    experiment_id,
    log_params,
)

ZERO_SHOT, EVAL, PROMPT_SEARCH = "zero_shot", "eval", "prompt_search"
SEARCH = "segtune.search"  # "prompt" on a prompt search's runs
SOURCE = "segtune.source"  # what an `eval` run scored: a path, runs:/ID, models:/NAME@ALIAS


def open_run(uri: str, experiment: str, *, kind: str, run_name: str, params: dict[str, Any],
             tags: dict[str, str], parent_run_id: str | None = None, sweep_id: str = "none",
             trial_id: str | None = None) -> TrialRun:
    """Create a run of `kind` with params and tags; returns it as a TrialRun to log into."""
    client = MlflowClient(uri)
    exp = experiment_id(client, experiment)
    all_tags = {**tags, KIND: kind, SWEEP_ID: sweep_id, MLFLOW_RUN_NAME: run_name}
    if trial_id is not None:
        all_tags[TRIAL_ID] = trial_id
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_id = create_run(client, exp, all_tags)  # tags redacted there, as every run's
    log_params(client, run_id, params)
    return TrialRun(client, run_id)


def log_folder(run: Any, local: Path, artifact_path: str) -> bool:
    """Upload a folder's files under `artifact_path` of a run (any object with `client` and
    `run_id`, such as a TrialRun); False when there is no such run or the server is away.

    Figures are a convenience: a tracking outage must not fail the run that makes them.
    """
    client, run_id = getattr(run, "client", None), getattr(run, "run_id", None)
    if client is None or run_id is None:
        return False
    try:
        client.log_artifacts(run_id, str(local), artifact_path)
        return True
    except UNREACHABLE:
        return False


def child_runs(uri: str, experiment: str, sweep_id: str, kind: str = ZERO_SHOT) -> list[Any]:
    """The runs of kind `kind` that belong to sweep (or prompt search) `sweep_id`."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = '{kind}'"),
        order_by=["attributes.start_time ASC"], max_results=5000)


def end_run(uri: str, run_id: str, tags: dict[str, Any], status: str = "FINISHED") -> None:
    """Tag a parent run with its outcome and close it."""
    client = MlflowClient(uri)
    secrets = secret_values()
    for k, v in tags.items():
        if v is not None:
            client.set_tag(run_id, k, redact(str(v), secrets)[:5000])
    client.set_terminated(run_id, status)
