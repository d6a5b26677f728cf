"""What `segtune sweep`, `train` and `demo` do, as functions: check, prepare, sweep, summarise.

The CLI parses arguments and prints; these functions do the work and are what tests call.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from segtune.config import ExperimentConfig, flatten
from segtune.provenance import git_sha

Log = Callable[[str], None]


def prepare_data(cfg: ExperimentConfig, log: Log = print) -> tuple[Path, str]:
    """Prepare (or reuse) the experiment's patch store; returns its path and content hash."""
    from segtune.data import dataset_options, open_store, prepare_store

    d = cfg.dataset
    store = prepare_store(d.name, Path(d.root), Path(d.cache_dir), patch_size=d.patch_size,
                          drop_empty=d.drop_empty, val_fraction=d.val_fraction, seed=cfg.train.seed,
                          fit=d.fit, options=dataset_options(d), progress=log)
    return store.resolve(), open_store(store).hash


def check_names(cfg: ExperimentConfig) -> None:
    """Registry names and policies in the config, checked before anything starts."""
    from segtune.errors import ConfigError
    from segtune.losses import LOSSES
    from segtune.models import MODELS
    from segtune.prompts import PROMPTS

    checks = [("model.name", cfg.model.name, MODELS), ("train.loss", cfg.train.loss, LOSSES),
              ("prompt.train", cfg.prompt.train, PROMPTS), ("prompt.eval", cfg.prompt.eval, PROMPTS)]
    for field, value, registry in checks:
        if value not in registry:
            raise ConfigError(f"{field}: unknown value {value!r}; expected one of {', '.join(registry)}.")


def check_writable(cfg: ExperimentConfig, *, sweep: bool = True) -> None:
    """The folders a run writes to, tried before anything starts (a URI storage is checked elsewhere)."""
    import tempfile

    from segtune.errors import ConfigError

    folders = {"dataset.cache_dir": cfg.dataset.cache_dir, "tracking.spool_dir": cfg.tracking.spool_dir}
    if sweep and "://" not in cfg.search.storage_path:
        folders["search.storage_path"] = cfg.search.storage_path
    for field, folder in folders.items():
        path = Path(folder).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".segtune-write-test-"):
                pass
        except OSError as err:
            raise ConfigError(f"{field}: cannot write to {path} ({err.strerror or err}); "
                              "point it at a folder this user can write to.") from None


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    closed: dict[str, str]
    interrupted: bool = False
    unsent: dict[str, object] | None = None  # runs whose spooled data the server has not taken yet


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
    return (f"**{cfg.name}**: {s.num_samples} trials of `{cfg.model.key}` (policy `{cfg.model.train}`) on "
            f"`{cfg.dataset.name}`, prompts `{cfg.prompt.train}` (train) / `{cfg.prompt.eval}` (eval), "
            f"loss `{cfg.train.loss}`, optimizer `{cfg.train.optimizer}`.\n\n"
            f"Search: {s.searcher} + {s.scheduler} on `{s.metric}` ({s.mode}), {s.max_concurrent} at a time, "
            f"over {space}.\n\nSweep `{sweep_id}`, code `{sha}`. Each trial is a nested run; promote the best "
            f"with `segtune promote {cfg.tracking.experiment}`.")


def _resume_target(cfg: ExperimentConfig, resume: bool | str) -> tuple[str, str] | None:
    """(sweep id, parent run id) of the sweep to resume, checked against the config."""
    from segtune.errors import ConfigError
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
    from segtune.config import set_path, parse_override, validate
    from segtune.errors import ConfigError

    f = Path(path) / SWEEP_FILE
    if not f.is_file():
        raise ConfigError(f"--resume {path}: no {SWEEP_FILE} there; expected the folder of a segtune sweep "
                          "under search.storage_path (e.g. .segtune/ray_results/demo-1a2b3c4d).")
    record = json.loads(f.read_text())
    raw = record["config"]
    for text in overrides or []:
        set_path(raw, *parse_override(text))
    return validate(raw, str(f)), record["sweep_id"]


def _record(cfg: ExperimentConfig, sweep_id: str) -> None:
    """Write the sweep's config beside Tune's state, so `--resume PATH` needs nothing else."""
    import pyarrow.fs

    from segtune.sweep import experiment_dir

    fs, root = pyarrow.fs.FileSystem.from_uri(experiment_dir(cfg, sweep_id))
    fs.create_dir(root)
    with fs.open_output_stream(f"{root}/{SWEEP_FILE}") as out:
        out.write(json.dumps({"sweep_id": sweep_id, "config": cfg.model_dump()}, indent=1).encode())


def sweep(cfg: ExperimentConfig, *, address: str | None = None, resume: bool | str = False,
          log: Log = print) -> SweepOutcome:
    """Run a whole sweep: check the server, prepare data, open the parent run, tune, close runs.

    `resume=True` continues the latest unfinished sweep of this experiment file (a sweep id
    continues that one): finished trials stay done, unfinished ones continue from their last
    checkpoint, each trial keeps its MLflow run.
    """
    from segtune.cluster import preflight
    from segtune.sweep import SweepContext, run_sweep
    from tracking.runs import close_open_trials, end_sweep_run, quiet_mlflow, reopen_run, start_sweep_run
    from tracking.server import check_server
    from tracking.spool import deliver_all

    quiet_mlflow()
    check_names(cfg)
    check_server(cfg.tracking.uri)
    check_writable(cfg)  # after the server check: an unreachable server leaves nothing behind
    preflight(cfg, address)  # resources and shared storage, before data or runs are touched
    target = _resume_target(cfg, resume)
    store, data_hash = prepare_data(cfg, log)
    sha = git_sha()
    if target is None:
        sweep_id = uuid.uuid4().hex[:8]
        _record(cfg, sweep_id)
        params = {**flatten(cfg), **{f"search.space.{k}": v.model_dump(exclude_none=True)
                                     for k, v in cfg.search.space.items()},
                  "search.num_samples": cfg.search.num_samples, "search.scheduler": cfg.search.scheduler}
        parent = start_sweep_run(cfg.tracking.uri, cfg.tracking.experiment, sweep_id, params,
                                 name=f"sweep {cfg.model.key} {cfg.dataset.name} [{sweep_id}]",
                                 description=sweep_description(cfg, sweep_id, sha),
                                 tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
                                       "segtune.git_sha": sha, "segtune.data_hash": data_hash,
                                       "segtune.name": cfg.name, "segtune.space_hash": space_hash(cfg)})
        log(f"sweep {sweep_id}: {cfg.search.num_samples} trials of {cfg.model.key} on {cfg.dataset.name}, "
            f"{cfg.search.max_concurrent} at a time; parent run {parent}")
    else:
        sweep_id, parent = target
        reopen_run(cfg.tracking.uri, parent)
        log(f"resuming sweep {sweep_id} (parent run {parent})")
    spool = str(Path(cfg.tracking.spool_dir).resolve())
    ctx = SweepContext(store=str(store), data_hash=data_hash, sweep_id=sweep_id, parent_run_id=parent,
                       git_sha=sha, spool_dir=spool)
    statuses: dict[str, str] | None = None
    status = "FAILED"
    try:
        statuses = run_sweep(cfg, ctx, address=address, log=log)
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
        end_sweep_run(cfg.tracking.uri, parent, best_summary(cfg, sweep_id), status)
        if status == "KILLED":
            log(f"sweep {sweep_id} interrupted; its state is saved. Continue it with: "
                f"segtune sweep FILE --resume   (or --resume {experiment_dir_of(cfg, sweep_id)})")
        if unsent:
            log(f"{len(unsent)} runs still hold data the tracking server did not take; deliver it later "
                f"with: segtune sync --tracking-uri {cfg.tracking.uri} --spool {spool}")
    return SweepOutcome(sweep_id, parent, closed, status == "KILLED", unsent or None)


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
    from segtune.sweep import experiment_dir

    return experiment_dir(cfg, sweep_id)


def best_summary(cfg: ExperimentConfig, sweep_id: str) -> dict[str, object]:
    """The best trial by `val/dice_best`, for the parent run's tags (empty if none finished)."""
    from tracking.registry import select_best
    from tracking.runs import trial_runs
    from tracking.errors import TrackingError

    try:
        best = select_best(trial_runs(cfg.tracking.uri, cfg.tracking.experiment, sweep_id), "val/dice_best")
    except TrackingError:
        return {}
    return {"run_id": best.info.run_id, "trial_id": best.data.tags.get("segtune.trial_id"),
            "val_dice_best": best.data.metrics.get("val/dice_best"), "test_iou": best.data.metrics.get("test/iou")}


def train_one(cfg: ExperimentConfig, workdir: Path, *, track: bool = True, log: Log = print) -> dict:
    """`segtune train`: one trial with the config's values, no Ray; logged as a standalone run."""
    from segtune.train import TrialContext, run_trial
    from tracking.runs import TrialRun
    from tracking.server import check_server

    check_names(cfg)
    check_writable(cfg, sweep=False)
    if cfg.resources.workers > 1:
        log(f"resources.workers={cfg.resources.workers} applies to sweeps (a Ray Train trainer per trial); "
            "`segtune train` runs one process")
    tracker = None
    store, data_hash = prepare_data(cfg, log)
    if track:
        check_server(cfg.tracking.uri)
        trial_id = f"train-{uuid.uuid4().hex[:8]}"
        tracker = TrialRun.open(cfg.tracking.uri, cfg.tracking.experiment, sweep_id="none", trial_id=trial_id,
                                parent_run_id=None, params=flatten(cfg),
                                tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
                                      "segtune.git_sha": git_sha(), "segtune.data_hash": data_hash})
        log(f"run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {cfg.tracking.uri}")
    try:
        return run_trial(cfg, TrialContext(store=store, workdir=workdir, tracker=tracker, log=log))
    except BaseException as err:
        if tracker is not None:
            tracker.fail(err)
        raise


def untrained_test_iou(cfg: ExperimentConfig, store: Path) -> float:
    """Test IoU of the model before any training: the baseline a sweep must beat."""
    from accelerate import Accelerator

    from segtune.models import build_model
    from segtune.train import evaluate, make_loaders

    _, _, test, _ = make_loaders(cfg, store)
    return evaluate(build_model(cfg.model), test, Accelerator(cpu=True))["iou"]
