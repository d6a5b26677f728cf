"""Around one trial: how its MLflow run is opened and tagged, its log file, and how it fails.

Every run segtune opens carries the same provenance tags (`run_tags`): sweep trials, Ray Train
workers, `segtune train`, evaluations and prompt searches all take them from here (code, user,
source and the prepared store, from segtune.provenance). `tracked`
wraps the work of a run, so an error ends it FAILED with the reason on the run.
No Ray here: the Ray layer passes in what it knows (the node a trial runs on).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from segtune import provenance
from segtune.config import ExperimentConfig, flatten
from segtune.train import Tracker
from tracking.runs import TrialRun

# A trial retries a request to a server that is down a couple of times, then spools and goes
# on training; MLflow's own default would block a trial for minutes.
_TRIAL_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class SweepContext:
    """What every trial of a sweep shares besides its parameters."""

    store: str
    data_hash: str
    sweep_id: str
    parent_run_id: str | None
    git_sha: str
    spool_dir: str


def run_tags(cfg: ExperimentConfig, *, git_sha: str, data_hash: str, store: str | Path | None = None,
             source_type: str | None = None) -> dict[str, str]:
    """The tags every segtune run carries: which model, which data, which code, who and how.

    segtune's own (`segtune.*`) and MLflow's standard ones (`mlflow.source.*`, `mlflow.user`),
    which fill the UI's source and user columns. The prepared store `store` is named with its
    split counts; tracking logs it as the run's MLflow dataset input (tracking.lineage).
    """
    tags = {"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
            "segtune.git_sha": git_sha, "segtune.data_hash": data_hash,
            "mlflow.source.name": f"segtune {cfg.name}", "mlflow.source.type": source_type or provenance.source_type(),
            "mlflow.user": provenance.user()}
    commit = provenance.git_commit(git_sha)
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit
    counts = provenance.store_counts(store) if store is not None else None
    if counts is not None:
        tags["segtune.store"], tags["segtune.data_counts"] = str(store), counts
    return tags


def trial_client_env() -> None:
    """Short MLflow client retries for this trial process (see _TRIAL_CLIENT_ENV)."""
    for key, value in _TRIAL_CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def open_sweep_trial(cfg: ExperimentConfig, sweep: SweepContext, trial_id: str, *, node_id: str) -> TrialRun:
    """A sweep trial's MLflow child run (reattached on a retry), tagged with where this attempt runs."""
    tracker = TrialRun.open(
        cfg.tracking.uri, cfg.tracking.experiment, sweep_id=sweep.sweep_id, trial_id=trial_id,
        parent_run_id=sweep.parent_run_id, params=flatten(cfg),
        # Ray runs a sweep's trials as jobs of the sweep: MLflow's JOB source type.
        tags=run_tags(cfg, git_sha=sweep.git_sha, data_hash=sweep.data_hash, store=sweep.store, source_type="JOB"),
        spool_dir=Path(sweep.spool_dir),
        name=(f"{cfg.model.key} {cfg.dataset.name} lr={cfg.train.lr:.1e} bs={cfg.train.batch_size} "
              f"ep={cfg.train.epochs} [{trial_id}]"),
    )
    # Where this attempt runs (a retried or resumed trial moves): set on every attempt.
    tracker.set_tags({"segtune.node": node_id, "segtune.pid": str(os.getpid())})
    return tracker


def open_member_run(cfg: ExperimentConfig, sweep: SweepContext, trial_id: str, member: int, *,
                    trial_run_id: str, node_id: str, tags: dict[str, str]) -> TrialRun:
    """Member `member` of a sweep trial with repeats: a child run of the trial's run
    (`trial_run_id`), reattached on a retry, tagged like a trial run plus `tags`."""
    tracker = TrialRun.open(
        cfg.tracking.uri, cfg.tracking.experiment, sweep_id=sweep.sweep_id, trial_id=trial_id,
        parent_run_id=trial_run_id, params=flatten(cfg), member=member,
        tags={**run_tags(cfg, git_sha=sweep.git_sha, data_hash=sweep.data_hash, store=sweep.store, source_type="JOB"),
              **tags},
        spool_dir=Path(sweep.spool_dir), name=f"member {member} {tags.get('segtune.repeat', '')} [{trial_id}]")
    tracker.set_tags({"segtune.node": node_id, "segtune.pid": str(os.getpid())})
    return tracker


def open_single_trial(cfg: ExperimentConfig, *, git_sha: str, data_hash: str,
                      store: str | Path | None = None) -> TrialRun:
    """The standalone run of `segtune train` (no sweep, no parent)."""
    return TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="none",
                         trial_id=f"train-{uuid.uuid4().hex[:8]}", parent_run_id=None, params=flatten(cfg),
                         tags=run_tags(cfg, git_sha=git_sha, data_hash=data_hash, store=store))


@contextmanager
def tracked(tracker: Tracker, *, passes: tuple[type[BaseException], ...] = ()) -> Iterator[Tracker]:
    """Run a block for `tracker`'s run; an error that ends the block ends the run (`fail`:
    FAILED with the reason as tag `segtune.error`, KILLED for Ctrl-C) and is raised on.

    Errors of the `passes` types leave the run open: whoever raised them closes it (Tune
    stops a trial by raising SystemExit in its report; the sweep driver then knows why).
    """
    try:
        yield tracker
    except passes:
        raise
    except BaseException as err:
        tracker.fail(err)
        raise


@contextmanager
def trial_log(workdir: Path) -> Iterator[Callable[[str], None]]:
    """A function that appends a line to `workdir/trial.log` at once (a killed trial keeps its log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "trial.log", "a") as file:

        def log(line: str) -> None:
            from tracking.redact import redact

            file.write(redact(line) + "\n")
            file.flush()

        yield log
