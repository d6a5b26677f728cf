"""Promotion in the MLflow Model Registry: select, register, record gates, move aliases, approve.

Selection is on a validation metric (`val/dice_best` by default; `val/dice_lcb`, the lower
confidence bound over its members, for a sweep with repeats), never on the test split. A
trial with members registers its best member's checkpoint (`best_member`).
A promotion registers the best finished trial as a new model version under alias
`challenger` and records its gates (a Markdown report as the version's description and as an
artifact of the trial's run, plus `segtune.gate.*` tags). Only a version whose gates passed
takes `champion`, through `approve`, which records who, when and why; `force=True` overrides
failed gates and is recorded as such. What the version holds and how the gates are judged is
segtune's business (segtune.promotion): this module only talks to MLflow.
"""

from __future__ import annotations

import getpass
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking.artifacts import verify_manifest
from tracking.errors import TrackingError
from tracking.redact import redact
from tracking.runs import MEMBER, PRUNED, member_runs, quiet_mlflow, trial_runs

CHECKPOINT_ARTIFACT = "checkpoints/best"
CHALLENGER, CHAMPION = "challenger", "champion"
GATES = "segtune.gates"  # a version's verdict: "passed" or "failed"
GATE = "segtune.gate."  # one tag per gate: segtune.gate.<name> = passed | failed
REPORT_DIR = "gates"  # the gate reports on the trial's run: gates/<name>-v<version>.md
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Gate:
    """One check a version must pass before it may take `champion`."""

    name: str
    passed: bool
    detail: str


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
    gates: list[Gate] = field(default_factory=list)
    approved: bool = False

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)


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


REPEATS = "segtune.repeats"  # on the trial and member runs of a sweep with repeats, e.g. "seeds:3"
LCB = "val/dice_lcb"


def selection_metric(uri: str, experiment: str, *, sweep_id: str | None = None, run_id: str | None = None) -> str:
    """What promotion ranks on when not told: `val/dice_lcb` for trials with repeats (a trial
    run that has members), else `val/dice_best`."""
    if run_id is not None:
        try:
            runs = [MlflowClient(uri).get_run(run_id)]
        except MlflowException:
            runs = []  # select_run says what is wrong with it
    else:
        runs = trial_runs(uri, experiment, sweep_id)
    return LCB if any(r.data.tags.get(REPEATS) and r.data.tags.get("segtune.kind") == "trial" for r in runs) \
        else "val/dice_best"


def best_member(uri: str, trial: Run) -> Run | None:
    """The member of a trial with repeats whose checkpoint is registered: the finished member
    with the highest val/dice_best. None for a run without members."""
    if not trial.data.tags.get(REPEATS) or trial.data.tags.get("segtune.kind") != "trial":
        return None
    members = member_runs(uri, trial)
    done = [m for m in members if m.info.status == "FINISHED" and "val/dice_best" in m.data.metrics]
    if not done:
        raise TrackingError(f"trial run {trial.info.run_id} has repeats but none of its {len(members)} member "
                            "runs finished with a val/dice_best; it cannot be promoted.")
    return max(done, key=lambda m: (m.data.metrics["val/dice_best"], -int(m.data.tags.get(MEMBER, "0"))))


def check_promotable(run: Run, metric: str) -> None:
    """Refuse a run that is not FINISHED or lacks the selection metric."""
    rid = run.info.run_id
    if run.info.status != "FINISHED":
        raise TrackingError(f"run {rid} is {run.info.status}, not FINISHED; only finished trials are promoted.")
    if metric not in run.data.metrics:
        raise TrackingError(f"run {rid} has no metric {metric!r}; was it stopped early by the scheduler?")


def select_run(uri: str, experiment: str, *, metric: str = "val/dice_best", mode: str = "max",
               sweep_id: str | None = None, run_id: str | None = None) -> Run:
    """The run to promote: `run_id`, or the best finished trial of the sweep (the latest one)."""
    quiet_mlflow()
    client = MlflowClient(uri)
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            raise TrackingError(f"--run {run_id}: no such run at {redact(uri)} "
                                f"({err.message.splitlines()[0][:200]}).") from None
    else:
        runs = trial_runs(uri, experiment, sweep_id)
        if not runs:
            raise TrackingError(f"experiment {experiment!r} at {redact(uri)} has no sweep trials to promote; "
                                "expected the experiment name of a sweep (the file's tracking.experiment).")
        run = select_best(runs, metric, mode)
    check_promotable(run, metric)
    return run


def fetch_checkpoint(uri: str, run_id: str, dst: Path) -> tuple[Path, str]:
    """Download a trial's best checkpoint and verify it against its manifest: (folder, sha256)."""
    local = Path(MlflowClient(uri).download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dst)))
    return local, verify_manifest(local)


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
            raise TrackingError(f"model version {name} v{version} is {mv.status}, not READY; alias not moved.")
        time.sleep(0.5)


def register(uri: str, run: Run, name: str, *, code_path: Path, artifacts: dict[str, str],
             tags: dict[str, Any], **log_model: Any) -> str:
    """Log the pyfunc model (from `code_path`) on the trial's run, register it as a new version
    of `name`, wait until it is READY and tag it; return the version. `log_model` goes to
    `mlflow.pyfunc.log_model` (code_paths, pip_requirements, signature, input_example, ...)."""
    rid = run.info.run_id
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=rid):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code_path), artifacts=artifacts,
                                       **log_model)
    version = str(mlflow.register_model(info.model_uri, name, await_registration_for=120).version)
    client = MlflowClient(uri)
    _wait_ready(client, name, version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, redact(str(v)))
    return version


def version_of(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """A version by number or alias, with a clear error naming what exists."""
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        pass
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        versions = []
    if not versions:
        raise TrackingError(f"no registered model {name!r}; expected the name `segtune promote` printed, "
                            "such as segtune-sam_tiny-synthetic_em.") from None
    what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
    raise TrackingError(f"model {name!r} has no {what}; its versions are {', '.join(map(str, versions))}.") from None


def champion_of(client: MlflowClient, name: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version `alias` points at, or None (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def record_gates(uri: str, name: str, version: str, run_id: str, gates: list[Gate], report: str,
                 tags: dict[str, Any] | None = None) -> bool:
    """Record a version's gates: `segtune.gate.<name>` tags, the verdict `segtune.gates`, the
    Markdown report as the version's description and as `gates/<name>-v<version>.md` on the
    trial's run. Returns whether every gate passed."""
    client = MlflowClient(uri)
    passed = bool(gates) and all(g.passed for g in gates)
    report = redact(report)
    client.log_text(run_id, report, f"{REPORT_DIR}/{name}-v{version}.md")
    client.update_model_version(name, version, description=report)
    values = {**(tags or {}), **{GATE + g.name: "passed" if g.passed else "failed" for g in gates}}
    # The verdict last: a version carries it only once its gates and report are recorded.
    values[GATES] = "passed" if passed else "failed"
    for k, v in values.items():
        client.set_model_version_tag(name, version, k, redact(str(v)))
    return passed


def best_version(client: MlflowClient, name: str, metric: str, mode: str, sweep_id: str,
                 *, passed_only: bool = False) -> str | None:
    """The sweep's READY version with the best recorded `metric` (ties: the newer); with
    `passed_only`, among those whose gates passed. None when there is none."""
    scored = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, mv.version)  # search results may omit tags
        if (full.status == "READY" and full.tags.get("segtune.metric") == metric
                and full.tags.get("segtune.sweep_id") == sweep_id
                and (not passed_only or full.tags.get(GATES) == "passed")):
            scored.append((float(full.tags["segtune.metric_value"]), int(full.version)))
    if not scored:
        return None
    best = max(scored, key=lambda sv: (sv[0] if mode == "max" else -sv[0], sv[1]))
    return str(best[1])


def point_alias_at_best(client: MlflowClient, name: str, alias: str, metric: str, mode: str, sweep_id: str,
                        *, passed_only: bool = False) -> str | None:
    """Move `alias` to the sweep's best version (`best_version`); return it.

    Every promotion ends by recomputing this over the versions registered from the same sweep
    (whose validation scores are comparable), so two promotions racing for the alias set the
    same answer whatever order their requests interleave in. A promotion from another sweep
    moves the alias to that sweep's best: the newest sweep promoted holds the challenger.
    """
    best = best_version(client, name, metric, mode, sweep_id, passed_only=passed_only)
    if best is not None:
        client.set_registered_model_alias(name, alias, best)
    return best


def approver() -> str:
    """Who approves: MLFLOW_TRACKING_USERNAME (the server's login) when set, else the OS user."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (a container): say so rather than fail
        return "unknown"


def failed_gates(mv: ModelVersion) -> list[str]:
    """The names of a version's failed gates (all of them "unrecorded" when it has none)."""
    if GATES not in mv.tags:
        return ["unrecorded"]
    return sorted(k[len(GATE):] for k, v in mv.tags.items() if k.startswith(GATE) and v != "passed")


def approve(uri: str, name: str, version: str, *, reason: str, force: bool = False, alias: str = CHAMPION,
            log: Callable[[str], None] = print) -> ModelVersion:
    """Point `alias` (champion) at `version` if its gates passed (or `force`), and record who,
    when, why and whether forced on the version's tags. Returns the version."""
    check_alias(alias)
    if not reason or not reason.strip():
        raise TrackingError("--reason: say why this version should serve, e.g. --reason \"beats v3 on val/dice\"; "
                            "it is recorded on the version.")
    client = MlflowClient(uri)
    mv = version_of(client, name, str(version))
    if mv.status != "READY":
        raise TrackingError(f"{name} v{mv.version} is {mv.status}, not READY; it cannot serve.")
    failed = failed_gates(mv)
    if failed and not force:
        what = ("has no gate report (it was registered before gates existed)" if failed == ["unrecorded"]
                else f"failed its gates: {', '.join(failed)}")
        raise TrackingError(f"{name} v{mv.version} {what}; its description in the registry says why. "
                            f"Approve it anyway with --force (recorded on the version), or promote another trial.")
    previous = champion_of(client, name, alias)
    client.set_registered_model_alias(name, alias, mv.version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {"segtune.approved_by": approver(), "segtune.approved_at": stamp,
            "segtune.approval_reason": reason.strip()[:5000], "segtune.approval_forced": str(bool(failed)).lower(),
            "segtune.approved_as": alias,
            "segtune.approved_over": previous.version if previous is not None else "none"}
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, redact(str(v)))
    if failed:
        log(f"{name} v{mv.version} approved as '{alias}' over failed gates ({', '.join(failed)}): forced, recorded")
    return client.get_model_version(name, mv.version)
