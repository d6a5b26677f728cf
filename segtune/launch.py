"""What `segtune sweep`, `train` and `demo` do, as functions: check, prepare, sweep, summarise.

The CLI parses arguments and prints; these functions do the work and are what tests call.
"""

from __future__ import annotations

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


@dataclass
class SweepOutcome:
    sweep_id: str
    parent_run_id: str
    closed: dict[str, str]


def sweep(cfg: ExperimentConfig, *, address: str | None = None, log: Log = print) -> SweepOutcome:
    """Run a whole sweep: check the server, prepare data, open the parent run, tune, close runs."""
    from segtune.sweep import SweepContext, run_sweep
    from tracking.runs import close_open_trials, end_sweep_run, quiet_mlflow, start_sweep_run
    from tracking.server import check_server

    quiet_mlflow()
    check_names(cfg)
    check_server(cfg.tracking.uri)
    store, data_hash = prepare_data(cfg, log)
    sweep_id = uuid.uuid4().hex[:8]
    sha = git_sha()
    params = {**flatten(cfg), **{f"search.space.{k}": v.model_dump(exclude_none=True)
                                 for k, v in cfg.search.space.items()},
              "search.num_samples": cfg.search.num_samples, "search.scheduler": cfg.search.scheduler}
    parent = start_sweep_run(cfg.tracking.uri, cfg.tracking.experiment, sweep_id, params,
                             tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
                                   "segtune.git_sha": sha, "segtune.data_hash": data_hash})
    log(f"sweep {sweep_id}: {cfg.search.num_samples} trials of {cfg.model.key} on {cfg.dataset.name}, "
        f"{cfg.search.max_concurrent} at a time; parent run {parent}")
    ctx = SweepContext(store=str(store), data_hash=data_hash, sweep_id=sweep_id, parent_run_id=parent, git_sha=sha)
    status = "FAILED"
    try:
        finished = run_sweep(cfg, ctx, address=address, log=log)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        closed = close_open_trials(cfg.tracking.uri, cfg.tracking.experiment, sweep_id,
                                   finished if status == "FINISHED" else set())
        end_sweep_run(cfg.tracking.uri, parent, best_summary(cfg, sweep_id), status)
    return SweepOutcome(sweep_id, parent, closed)


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
            tracker.set_tags({"segtune.error": f"{err.__class__.__name__}: {err}"[:5000]})
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def untrained_test_iou(cfg: ExperimentConfig, store: Path) -> float:
    """Test IoU of the model before any training: the baseline a sweep must beat."""
    from accelerate import Accelerator

    from segtune.models import build_model
    from segtune.train import evaluate, make_loaders

    _, _, test, _ = make_loaders(cfg, store)
    return evaluate(build_model(cfg.model), test, Accelerator(cpu=True))["iou"]
