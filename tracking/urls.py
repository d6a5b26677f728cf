"""Links into the MLflow UI: every URL segtune prints is built here.

MLflow 3's UI opens an experiment on its GenAI overview (traces, token usage) unless it is told
that the experiment is about model training: by the experiment tag `mlflow.experimentKind`
(set by `tracking.lineage`) in builds that read it, and in 3.17 by its GenAI / Model training
switch, which the `workflowType` query parameter sets from the URL (before the browser's
stored choice) and which stays while one navigates. Each link here names the page it is about
(an experiment's runs, a run, a model version) and carries `workflowType=machine_learning`, so
it opens on that page in the "Model training" view whatever the browser last showed (checked
in headless Chromium against MLflow 3.17's UI: a bare `/#/experiments/<id>` lands on the GenAI
overview even with the tag set).

The routes are those of MLflow 3's UI bundle (`mlflow/server/js`): `/#/experiments/<id>/runs`,
`/#/experiments/<id>/runs/<run id>`, `/#/models/<name>/versions/<version>`. Only an http(s)
tracking URI has a UI; for any other (a file store, `databricks`) the functions return None.
Credentials in the URI never reach a link: the user name and password are dropped.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

from mlflow.tracking import MlflowClient

WORKFLOW = "workflowType=machine_learning"


def ui_base(uri: str) -> str | None:
    """The UI's address for tracking URI `uri` without credentials, or None when it has no UI."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def runs_url(uri: str, experiment_id: str) -> str | None:
    """The runs table of an experiment (sweeps, their trials, evaluations)."""
    base = ui_base(uri)
    return None if base is None else f"{base}/#/experiments/{quote(str(experiment_id))}/runs?{WORKFLOW}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """One run's page: its parameters, metrics, dataset and artifacts."""
    base = ui_base(uri)
    if base is None:
        return None
    return f"{base}/#/experiments/{quote(str(experiment_id))}/runs/{quote(run_id)}?{WORKFLOW}"


def model_version_url(uri: str, name: str, version: str | int) -> str | None:
    """A registered model version's page: its source run, aliases, tags and schema."""
    base = ui_base(uri)
    return None if base is None else f"{base}/#/models/{quote(name, safe='')}/versions/{quote(str(version))}"


def experiment_runs_url(uri: str, experiment: str) -> str | None:
    """`runs_url` of the experiment named `experiment`, None when there is no UI or no such experiment."""
    if ui_base(uri) is None:
        return None
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    return None if exp is None else runs_url(uri, exp.experiment_id)


def run_url_of(uri: str, run_id: str) -> str | None:
    """`run_url` of a run known only by its id (its experiment is read from the server)."""
    if ui_base(uri) is None:
        return None
    return run_url(uri, MlflowClient(uri).get_run(run_id).info.experiment_id, run_id)
