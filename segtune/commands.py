"""What `segtune sweep`, `train`, `promote` and `demo` do, as functions: check, prepare, sweep,
summarise, promote.

The CLI parses arguments and prints; these functions do the work and are what tests call.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from segtune.config import ExperimentConfig, flatten
from segtune.errors import ConfigError
from segtune.prepare import Log, check_experiment, check_writable, prepare_data
from segtune.provenance import git_sha


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    closed: dict[str, str]
    interrupted: bool = False
    unsent: dict[str, object] | None = None  # runs whose spooled data the server has not taken yet
    statuses: dict[str, str] | None = None  # Tune's final status per trial id

    @property
    def finished(self) -> int:
        """Trials that ended with a result (completed, or stopped early by the scheduler)."""
        return sum(s == "TERMINATED" for s in (self.statuses or {}).values())

    @property
    def failed(self) -> int:
        return sum(s == "ERROR" for s in (self.statuses or {}).values())


def space_hash(cfg: ExperimentConfig) -> str:
    """A fingerprint of the search space and sample count: a resumed sweep must keep both."""
    space = {k: v.model_dump(exclude_none=True) for k, v in sorted(cfg.search.space.items())}
    blob = json.dumps({"space": space, "num_samples": cfg.search.num_samples}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SWEEP_FILE = "segtune_sweep.json"


def sweep_description(cfg: ExperimentConfig, sweep_id: str, sha: str) -> str:
    """The parent run's description in the MLflow UI (Markdown)."""
    s = cfg.search
    space = ", ".join(f"`{k}` {v.kind} {list(v.args) if not isinstance(v.args, list) else v.args}"
                      for k, v in s.space.items()) or "none"
    return (f"**{cfg.name}**: {s.num_samples} trials of `{cfg.model.key}` (policy `{cfg.model.freeze_policy}`) on "
            f"`{cfg.dataset.name}`, prompts `{cfg.prompt.train}` (train) / `{cfg.prompt.eval}` (eval), "
            f"loss `{cfg.train.loss}`, optimizer `{cfg.train.optimizer}`.\n\n"
            f"Search: {s.searcher} + {s.scheduler} on `{s.metric}` ({s.mode}), {s.max_concurrent} at a time, "
            f"over {space}.\n\nSweep `{sweep_id}`, code `{sha}`. Each trial is a nested run; promote the best "
            f"with `segtune promote {cfg.tracking.experiment}`.")


def _resume_target(cfg: ExperimentConfig, resume: bool | str) -> tuple[str, str] | None:
    """(sweep id, parent run id) of the sweep to resume, checked against the config."""
    from tracking.runs import find_sweep

    if not resume:
        return None
    sweep_id = None if resume is True else str(resume)
    parent = find_sweep(cfg.tracking.uri, cfg.tracking.experiment, cfg.name, sweep_id)
    if parent is None:
        what = f"sweep {sweep_id}" if sweep_id else f"an unfinished sweep of {cfg.name!r}"
        raise ConfigError(f"--resume: found no {what} in experiment {cfg.tracking.experiment!r} at "
                          f"{cfg.tracking.uri}; start a new sweep without --resume.")
    if parent.data.tags.get("segtune.space_hash") != space_hash(cfg):
        raise ConfigError(f"--resume: the search space or num_samples of {cfg.name!r} changed since sweep "
                          f"{parent.data.tags['segtune.sweep_id']} started; the searcher's history would not "
                          "match. Restore the original search: section, or start a new sweep.")
    return parent.data.tags["segtune.sweep_id"], parent.info.run_id


def load_resume_dir(path: Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, str]:
    """`segtune sweep --resume PATH`: the config and sweep id recorded in a Tune experiment folder."""
    from segtune.config import parse_override, set_path, validate

    f = Path(path) / SWEEP_FILE
    if not f.is_file():
        raise ConfigError(f"--resume {path}: no {SWEEP_FILE} there; expected the folder of a segtune sweep "
                          "under search.storage_path (e.g. .segtune/ray_results/demo-1a2b3c4d).")
    record = json.loads(f.read_text())
    raw = record["config"]
    for text in overrides or []:
        set_path(raw, *parse_override(text))
    cfg = validate(raw, str(f))
    if "***" in cfg.tracking.uri:
        raise ConfigError(f"--resume {path}: the sweep's tracking URI is recorded with its password masked "
                          f"({cfg.tracking.uri}); pass it again with --tracking-uri (or $MLFLOW_TRACKING_URI).")
    return cfg, record["sweep_id"]


def _record(cfg: ExperimentConfig, sweep_id: str) -> None:
    """Write the sweep's config beside Tune's state, so `--resume PATH` needs nothing else."""
    import pyarrow.fs

    from segtune.cluster import experiment_dir

    fs, root = pyarrow.fs.FileSystem.from_uri(experiment_dir(cfg, sweep_id))
    fs.create_dir(root)
    from tracking.redact import redact

    # Masked like every file segtune writes: `--resume PATH` then asks for the URI (see load_resume_dir).
    with fs.open_output_stream(f"{root}/{SWEEP_FILE}") as out:
        out.write(redact(json.dumps({"sweep_id": sweep_id, "config": cfg.model_dump()}, indent=1)).encode())


def run_sweep(cfg: ExperimentConfig, *, address: str | None = None, resume: bool | str = False,
              warm_start: str | None = None, log: Log = print) -> SweepOutcome:
    """Run a whole sweep: check the server, prepare data, open the parent run, tune, close runs.

    `resume=True` continues the latest unfinished sweep of this experiment file (a sweep id
    continues that one): finished trials stay done, unfinished ones continue from their last
    checkpoint, each trial keeps its MLflow run. `warm_start` (an experiment name, or `auto`
    for the file's own) seeds a new sweep's searcher with the finished trials of the same model,
    dataset, freeze policy and prompt there (segtune.warm_start).
    """
    from segtune import warm_start as warm_starts
    from segtune.budget import budget_stopped
    from segtune.cluster import preflight
    from segtune.robustness import score_finalists
    from segtune.trial import SweepContext, run_tags
    from segtune.tune import tune_trials
    from tracking.runs import (
        close_open_trials,
        end_sweep_run,
        log_run_json,
        log_run_values,
        quiet_mlflow,
        reopen_run,
        start_sweep_run,
        sweep_costs,
    )
    from tracking.server import check_server
    from tracking.spool import deliver_all

    quiet_mlflow()
    check_experiment(cfg)
    check_server(cfg.tracking.uri)
    check_writable(cfg)  # after the server check: an unreachable server leaves nothing behind
    preflight(cfg, address)  # resources and shared storage, before data or runs are touched
    target = _resume_target(cfg, resume)
    store, data_hash = prepare_data(cfg, log)
    sha = git_sha()
    warm = None
    if target is None:
        if warm_start:
            warm = warm_starts.load(cfg, cfg.tracking.experiment if warm_start == "auto" else warm_start, log)
        sweep_id = uuid.uuid4().hex[:8]
        _record(cfg, sweep_id)
        params = {**flatten(cfg), **{f"search.space.{k}": v.model_dump(exclude_none=True)
                                     for k, v in cfg.search.space.items()},
                  "search.num_samples": cfg.search.num_samples, "search.scheduler": cfg.search.scheduler}
        if cfg.search.budget_gpu_hours is not None:
            params["search.budget_gpu_hours"] = cfg.search.budget_gpu_hours
        parent = start_sweep_run(cfg.tracking.uri, cfg.tracking.experiment, sweep_id, params,
                                 name=f"sweep {cfg.model.key} {cfg.dataset.name} [{sweep_id}]",
                                 description=sweep_description(cfg, sweep_id, sha),
                                 tags={**run_tags(cfg, git_sha=sha, data_hash=data_hash, store=store),
                                       "segtune.name": cfg.name, "segtune.space_hash": space_hash(cfg),
                                       **_warm_tags(warm)})
        if warm is not None:
            log_run_json(cfg.tracking.uri, parent, warm.record(), WARM_START_FILE)
        log(f"sweep {sweep_id}: {cfg.search.num_samples} trials of {cfg.model.key} on {cfg.dataset.name}, "
            f"{cfg.search.max_concurrent} at a time; parent run {parent}")
    else:
        sweep_id, parent = target
        reopen_run(cfg.tracking.uri, parent)
        log(f"resuming sweep {sweep_id} (parent run {parent})"
            + ("; --warm-start is for new sweeps: the resumed searcher keeps its own history" if warm_start else ""))
    spool = str(Path(cfg.tracking.spool_dir).resolve())
    shared = SweepContext(store=str(store), data_hash=data_hash, sweep_id=sweep_id, parent_run_id=parent,
                          git_sha=sha, spool_dir=spool)
    statuses: dict[str, str] | None = None
    status = "FAILED"
    try:
        statuses = tune_trials(cfg, shared, address=address, warm=warm, log=log)
        interrupted = any(s not in ("TERMINATED", "ERROR") for s in statuses.values())
        status = "KILLED" if interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _await_server(cfg.tracking.uri, log)
        # Deliver what trials spooled while the server was away, before judging open runs.
        unsent = {k: v for k, v in deliver_all(cfg.tracking.uri, Path(spool)).items() if isinstance(v, str)}
        closed = close_open_trials(cfg.tracking.uri, cfg.tracking.experiment, sweep_id, statuses)
        stopped = budget_stopped(sweep_id)
        costs = sweep_costs(cfg.tracking.uri, cfg.tracking.experiment, sweep_id)
        log_run_values(cfg.tracking.uri, parent, costs, {"segtune.budget_stopped": "true"} if stopped else None)
        if stopped is not None:
            log(f"sweep {sweep_id}: stopped launching trials at {stopped:.4g} of search.budget_gpu_hours="
                f"{cfg.search.budget_gpu_hours:g}; {len(statuses or {})} of {cfg.search.num_samples} trials ran")
        end_sweep_run(cfg.tracking.uri, parent, best_summary(cfg, sweep_id), status)
        if status == "KILLED":
            log(f"sweep {sweep_id} interrupted; its state is saved. Continue it with: "
                f"segtune sweep FILE --resume   (or --resume {experiment_dir_of(cfg, sweep_id)})")
        if unsent:
            log(f"{len(unsent)} runs still hold data the tracking server did not take; deliver it later "
                f"with: segtune sync --tracking-uri {cfg.tracking.uri} --spool {spool}")
    if status == "FINISHED" and not unsent:  # the finalists' prompt-robustness matrix (segtune.robustness)
        score_finalists(cfg, sweep_id, parent, log=log)
        try:  # importance, parallel coordinates, a narrowed space (segtune.insight): never fails the sweep
            from segtune.insight import what_mattered

            what_mattered(cfg, sweep_id, parent, log=log)
        except Exception as err:
            log(f"what mattered in sweep {sweep_id} was not logged: {type(err).__name__}: {err}")
    return SweepOutcome(sweep_id, parent, closed, status == "KILLED", unsent or None, statuses)


WARM_START_FILE = "warm_start.json"  # on the sweep run: the runs that seeded it, and those skipped


def _warm_tags(warm) -> dict[str, str]:
    """The sweep run's tags naming the runs that seeded its searcher (the whole list, with the
    skipped ones and why, is its `warm_start.json`)."""
    if warm is None:
        return {}
    runs = ",".join(warm.run_ids)
    return {"segtune.warm_start.experiment": warm.experiment, "segtune.warm_start.count": str(len(warm.run_ids)),
            "segtune.warm_start.skipped": str(len(warm.skipped)),
            # MLflow keeps tags up to 8000 characters: about 240 run ids.
            "segtune.warm_start.runs": runs if len(runs) <= 7000 else f"{len(warm.run_ids)} runs: see {WARM_START_FILE}"}


def _await_server(uri: str, log: Log, patience: float = 120.0) -> None:
    """At the end of a sweep the runs must be closed: give a restarting server some time."""
    from tracking.errors import TrackingError
    from tracking.server import check_server, wait_healthy

    try:
        check_server(uri)
    except TrackingError:
        log(f"the tracking server at {uri} does not answer; waiting up to {patience:.0f} s to deliver the "
            "trials' spooled data and close their runs")
        try:
            wait_healthy(uri, timeout=patience)
        except TrackingError as err:
            raise TrackingError(f"{err} The sweep's training is done and its Tune state saved, but its MLflow "
                                "runs are still open and spooled data is undelivered: once the server is back, "
                                "run `segtune sync`, then `segtune sweep FILE --resume` to close the runs.") from None


def experiment_dir_of(cfg: ExperimentConfig, sweep_id: str) -> str:
    from segtune.cluster import experiment_dir

    return experiment_dir(cfg, sweep_id)


def best_summary(cfg: ExperimentConfig, sweep_id: str) -> dict[str, object]:
    """The best trial by `val/dice_best`, for the parent run's tags (empty if none finished)."""
    from tracking.errors import TrackingError
    from tracking.registry import select_best
    from tracking.runs import trial_runs

    try:
        best = select_best(trial_runs(cfg.tracking.uri, cfg.tracking.experiment, sweep_id), "val/dice_best")
    except TrackingError:
        return {}
    return {"run_id": best.info.run_id, "trial_id": best.data.tags.get("segtune.trial_id"),
            "val_dice_best": best.data.metrics.get("val/dice_best"), "test_iou": best.data.metrics.get("test/iou")}


def train_one(cfg: ExperimentConfig, workdir: Path, *, track: bool = True, log: Log = print) -> dict:
    """`segtune train`: one trial with the config's values, no Ray; logged as a standalone run."""
    from segtune.train import TrialContext, run_trial
    from segtune.trial import open_single_trial, tracked
    from tracking.runs import quiet_mlflow
    from tracking.server import check_server
    from tracking.urls import run_url_of  # the run's page, not the server's front page

    quiet_mlflow()  # MLflow would print each run's URL, the tracking URI's password included
    check_experiment(cfg)
    check_writable(cfg, tune_storage=False)
    if cfg.resources.workers > 1:
        log(f"resources.workers={cfg.resources.workers} applies to sweeps (a Ray Train trainer per trial); "
            "`segtune train` runs one process")
    store, data_hash = prepare_data(cfg, log)
    ctx = TrialContext(store=store, workdir=workdir, log=log)
    if track:
        check_server(cfg.tracking.uri)
        ctx.tracker = open_single_trial(cfg, git_sha=git_sha(), data_hash=data_hash, store=store)

        log(f"run {ctx.tracker.run_id} in experiment {cfg.tracking.experiment!r}: "
            f"{run_url_of(cfg.tracking.uri, ctx.tracker.run_id) or cfg.tracking.uri}")
    with tracked(ctx.tracker):
        return run_trial(cfg, ctx)


def untrained_test_iou(cfg: ExperimentConfig, store: Path) -> float:
    """Test IoU of the model before any training: the baseline a sweep must beat."""
    from accelerate import Accelerator

    from segtune.loaders import make_loaders
    from segtune.models import build_model
    from segtune.scoring import score_loader

    _, _, test, _ = make_loaders(cfg, store)
    return score_loader(build_model(cfg.model), test, accelerator=Accelerator(cpu=True))[0]["iou"]


def promote_best(uri: str, experiment: str, *, metric: str | None = None, mode: str = "max",
                 alias: str = "challenger", sweep_id: str | None = None, run_id: str | None = None,
                 name: str | None = None, approve: bool = False, reason: str | None = None,
                 force: bool = False, tolerance: float | None = None, min_margin: float = 0.0,
                 min_prompt_iou: dict[str, float] | None = None, ensemble: bool = False, log: Log = print):
    """`segtune promote`: register the best trial as a self-contained version under `alias`
    (challenger), judge its gates, and with `approve` make it champion (segtune.promotion)."""
    from segtune.promotion import RESCORE_TOLERANCE, promote

    p = promote(uri, experiment, metric=metric, mode=mode, alias=alias, sweep_id=sweep_id, run_id=run_id,
                name=name, approve=approve, reason=reason, force=force,
                tolerance=RESCORE_TOLERANCE if tolerance is None else tolerance, min_margin=min_margin,
                min_prompt_iou=min_prompt_iou, ensemble=ensemble, log=log)
    verdict = "passed" if p.passed else "FAILED"
    log(f"{p.name} v{p.version}: gates {verdict} (sha256 {p.sha256[:12]}…, {p.metric}={p.value:.4f})")
    if p.approved:
        log(f"load it: mlflow.pyfunc.load_model('models:/{p.name}@champion'); serve it: segtune serve {p.name}")
    elif not approve:
        log(f"approve it: segtune approve {p.name} --version {p.version} --reason TEXT"
            + ("" if p.passed else " --force   (its gates failed)"))
    return p
