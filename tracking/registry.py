"""Promotion: pick the best finished trial, verify its checkpoint, register it, move an alias.

Selection is on a validation metric (`val/dice_best` by default), never on the test split. The
registered version is an MLflow pyfunc model logged from code (a file path, MLflow's "models
from code") whose artifact is the verified checkpoint, so
`mlflow.pyfunc.load_model("models:/NAME@champion")` predicts masks.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tracking.artifacts import verify_manifest
from tracking.errors import TrackingError
from tracking.runs import PRUNED, quiet_mlflow, trial_runs

CHECKPOINT_ARTIFACT = "checkpoints/best"
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    run_id: str
    metric: str
    value: float
    sha256: str
    model_uri: str


def check_alias(alias: str) -> None:
    """Refuse alias names MLflow reserves (`latest`, `v<N>`) or cannot store, before any request."""
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias) or not _ALIAS.match(alias):
        raise TrackingError(f"--alias {alias!r}: not a usable alias; MLflow reserves 'latest' and 'v<number>', "
                            "and aliases may hold only letters, digits, '_' and '-'.")


def registered_name(run: Run) -> str:
    """`segtune-<model>-<dataset>` from the run's tags."""
    tags = run.data.tags
    return f"segtune-{tags.get('segtune.model', 'model')}-{tags.get('segtune.dataset', 'data')}"


def select_best(runs: list[Run], metric: str, mode: str = "max") -> Run:
    """The finished, unpruned run with the best value of `metric`."""
    ok = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics
          and r.data.tags.get(PRUNED) != "true"]
    if not ok:
        raise TrackingError(f"no finished trial has metric {metric!r} among {len(runs)} runs; "
                            "has the sweep finished, and did any trial complete its epochs?")
    return (max if mode == "max" else min)(ok, key=lambda r: r.data.metrics[metric])


def check_promotable(run: Run, metric: str) -> None:
    """Refuse a run that is not FINISHED or lacks the selection metric."""
    rid = run.info.run_id
    if run.info.status != "FINISHED":
        raise TrackingError(f"run {rid} is {run.info.status}, not FINISHED; only finished trials are promoted.")
    if metric not in run.data.metrics:
        raise TrackingError(f"run {rid} has no metric {metric!r}; was it stopped early by the scheduler?")


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
            raise TrackingError(f"model version {name} v{version} is {mv.status}, not READY; alias not moved.")
        time.sleep(0.5)


def promote(uri: str, experiment: str, *, code_path: Path, metric: str = "val/dice_best",
            mode: str = "max", alias: str = "champion", sweep_id: str | None = None,
            run_id: str | None = None, pip_requirements: list[str] | None = None,
            log: Callable[[str], None] = print) -> Promotion:
    """Register the best (or the given) trial's verified checkpoint and point `alias` at it."""
    check_alias(alias)
    quiet_mlflow()
    client = MlflowClient(uri)
    if run_id is not None:
        run = client.get_run(run_id)
    else:
        runs = trial_runs(uri, experiment, sweep_id)
        if not runs:
            raise TrackingError(f"experiment {experiment!r} at {uri} has no sweep trials to promote.")
        run = select_best(runs, metric, mode)
    check_promotable(run, metric)
    rid, value = run.info.run_id, run.data.metrics[metric]

    with tempfile.TemporaryDirectory(prefix="segtune-promote-") as tmp:
        local = Path(client.download_artifacts(rid, CHECKPOINT_ARTIFACT, tmp))
        sha = verify_manifest(local)
        log(f"checkpoint of run {rid} verified (sha256 {sha[:12]}…)")
        name = registered_name(run)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=rid):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(code_path), artifacts={"checkpoint": str(local)},
                pip_requirements=pip_requirements, metadata={"segtune.sha256": sha},
            )
    version = mlflow.register_model(info.model_uri, name, await_registration_for=120).version
    _wait_ready(client, name, version)
    tags: dict[str, Any] = {"segtune.run_id": rid, "segtune.metric": metric, "segtune.metric_value": value,
                            "segtune.sha256": sha, "segtune.trial_id": run.data.tags.get("segtune.trial_id", ""),
                            "segtune.sweep_id": run.data.tags.get("segtune.sweep_id", "")}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    best = point_alias_at_best(client, name, alias, metric, mode, tags["segtune.sweep_id"])
    if best != str(version):
        log(f"version {version} is registered; '{alias}' stays on v{best}, which scores better on {metric}")
    return Promotion(name, str(version), alias, rid, metric, value, sha, f"models:/{name}@{alias}")


def point_alias_at_best(client: MlflowClient, name: str, alias: str, metric: str, mode: str, sweep_id: str) -> str:
    """Move `alias` to the sweep's READY version with the best recorded `metric`; return it.

    Every promotion ends by recomputing this over the versions registered from the same sweep
    (whose validation scores are comparable), so two promotions racing for the alias set the
    same answer whatever order their requests interleave in. A promotion from another sweep
    moves the alias to that sweep's best: the newest sweep promoted holds the champion.
    """
    scored = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, mv.version)  # search results may omit tags
        if (full.status == "READY" and full.tags.get("segtune.metric") == metric
                and full.tags.get("segtune.sweep_id") == sweep_id):
            scored.append((float(full.tags["segtune.metric_value"]), int(full.version)))
    # Ties go to the newer version.
    best = max(scored, key=lambda sv: (sv[0] if mode == "max" else -sv[0], sv[1]))
    client.set_registered_model_alias(name, alias, str(best[1]))
    return str(best[1])
