"""A sweep: Ray Tune + OptunaSearch (TPE) + ASHA around `train.run_trial`.

The driver builds a `tune.Tuner` from the experiment's `search:` and `resources:` sections and
runs it against a local Ray (or a cluster with `address`). Each trial opens its own MLflow
child run under the sweep's parent run — there is no Ray MLflow callback, so there is exactly
one run per trial. After `fit()` the driver closes whatever a stopped trial could not.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ray import tune

from segtune.config import ExperimentConfig, SearchDim, apply_params, flatten, validate
from segtune.cluster import connect, storage_uri


@dataclass
class SweepContext:
    """What every trial of a sweep shares besides its parameters."""

    store: str
    data_hash: str
    sweep_id: str
    parent_run_id: str | None
    git_sha: str
    spool_dir: str


def experiment_dir(cfg: ExperimentConfig, sweep_id: str) -> str:
    """The Tune experiment folder of a sweep, under `search.storage_path` (a path or a URI)."""
    return f"{storage_uri(cfg.search.storage_path)}/{cfg.name}-{sweep_id}"


# A trial retries a request to a server that is down a couple of times, then spools and goes
# on training; MLflow's own default would block a trial for minutes.
_TRIAL_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tune_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """YAML search space -> Tune distributions. `randint: [a, b]` includes b (Optuna's convention)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "choice": lambda a: tune.choice(list(a)),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),
    }
    return {key: make[dim.kind](dim.args) for key, dim in space.items()}


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What Tune reserves for one trial. A multi-worker trial's Tune process only drives a
    TorchTrainer, whose workers reserve `resources` themselves (segtune.distributed)."""
    if cfg.resources.workers > 1:
        # No CPU: a fraction held here would keep the workers' placement group from fitting on a
        # node the trial fills exactly. Tune refuses an empty request; one byte of memory is not.
        return {"cpu": 0, "gpu": 0, "memory": 1}
    return {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}


def max_epochs(cfg: ExperimentConfig) -> int:
    """The most epochs any trial can run: ASHA's `max_t`."""
    dim = cfg.search.space.get("train.epochs")
    if dim is None:
        return cfg.train.epochs
    return int(max(dim.choice) if dim.choice is not None else dim.args[1])


def trial_client_env() -> None:
    """Short MLflow client retries for this trial process (see _TRIAL_CLIENT_ENV)."""
    for key, value in _TRIAL_CLIENT_ENV.items():
        os.environ.setdefault(key, value)


def open_tracker(cfg: ExperimentConfig, sweep: SweepContext, trial_id: str) -> Any:
    """The trial's MLflow child run (reattached on a retry), tagged with where this attempt runs."""
    import ray

    from tracking.runs import TrialRun

    tracker = TrialRun.open(
        cfg.tracking.uri, cfg.tracking.experiment, sweep_id=sweep.sweep_id, trial_id=trial_id,
        parent_run_id=sweep.parent_run_id, params=flatten(cfg),
        tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name,
              "segtune.git_sha": sweep.git_sha, "segtune.data_hash": sweep.data_hash},
        spool_dir=Path(sweep.spool_dir),
        name=(f"{cfg.model.key} {cfg.dataset.name} lr={cfg.train.lr:.1e} bs={cfg.train.batch_size} "
              f"ep={cfg.train.epochs} [{trial_id}]"),
    )
    # Where this attempt runs (a retried or resumed trial moves): set on every attempt.
    tracker.set_tags({"segtune.node": ray.get_runtime_context().get_node_id(), "segtune.pid": str(os.getpid())})
    return tracker


@contextmanager
def trial_log(workdir: Path) -> Iterator[Callable[[str], None]]:
    """A function that appends a line to `workdir/trial.log` at once (a killed trial keeps its log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "trial.log", "a") as file:

        def log(line: str) -> None:
            file.write(line + "\n")
            file.flush()

        yield log


def _trial(params: dict[str, Any], *, base: dict, sweep: SweepContext) -> None:
    """One Tune trial: the sampled params applied to the base config, then `run_trial`."""
    from ray import tune

    from segtune.train import TrialContext, run_trial

    trial_client_env()
    cfg = apply_params(validate(base, "sweep config"), params)
    tctx = tune.get_context()
    trial_id, workdir = tctx.get_trial_id(), Path(tctx.get_trial_dir())
    with trial_log(workdir) as log:
        if cfg.resources.workers > 1:
            from segtune.distributed import run_distributed

            run_distributed(cfg, params, base, sweep, trial_id, log)
            return
        tracker = open_tracker(cfg, sweep, trial_id)
        resume_from = _restorable(tune.get_checkpoint(), workdir / "restored", log)

        def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

        ctx = TrialContext(store=Path(sweep.store), workdir=workdir, tracker=tracker, report=report,
                           resume_from=resume_from, log=log)
        try:
            run_trial(cfg, ctx)
        except SystemExit:
            # Tune stops a trial by raising SystemExit inside report(): ASHA pruned it, or the sweep
            # is being interrupted. Only the driver knows which, so it closes the run (launch.sweep).
            raise
        except BaseException as err:
            tracker.fail(err)
            raise


def _restorable(restored: Any, local: Path, log: Callable[[str], None]) -> Path | None:
    """Download Tune's latest checkpoint of this trial, or an older kept one if it is damaged."""
    if restored is None:
        return None
    import pyarrow.fs

    from segtune.checkpoint import first_intact

    fs, parent = restored.filesystem, restored.path.rsplit("/", 1)[0]
    kept = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    candidates = [restored.path] + sorted((p for p in kept if p != restored.path), reverse=True)
    local_dirs = []
    for n, path in enumerate(candidates):
        target = local / f"{n}"
        tune.Checkpoint(path, filesystem=fs).to_directory(str(target))
        local_dirs.append(target)
    found = first_intact(local_dirs, log)
    if found is None:
        log("no intact checkpoint of this trial survived; it starts again from epoch 1")
    return found


# Final Tune status of every trial, by sweep id, written by TrialProgress at the end. A module
# global, not an attribute: on resume Tune brings back the callback pickled with the first run.
FINAL_STATUSES: dict[str, dict[str, str]] = {}
_REAP_EVERY_S = 2.0


class TrialProgress(tune.Callback):
    """A compact progress line per trial event, instead of Tune's wide status table."""

    def __init__(self, sweep_id: str, total: int, default_epochs: int, log: Callable[[str], None],
                 multi_worker: bool = False):
        self.sweep_id, self.total, self.default_epochs, self.log = sweep_id, total, default_epochs, log
        self.multi_worker = multi_worker
        self._session()

    def on_step_begin(self, iteration, trials, **info):  # noqa: ANN001
        # Stopped multi-worker trials leave Ray Train's placement groups behind (segtune.distributed).
        if getattr(self, "multi_worker", False) and time.monotonic() - self._reaped_at > _REAP_EVERY_S:
            import ray

            from segtune.distributed import release_orphaned_groups

            self._reaped_at = time.monotonic()
            if n := release_orphaned_groups(ray.get_runtime_context().get_job_id()):
                self.log(f"  released {n} placement group(s) of stopped multi-worker trials")

    def _session(self) -> None:
        # Trials this driver session started, and how they ended. Tune marks the trials it stops
        # on Ctrl-C TERMINATED too; these sets tell a finished trial from an interrupted one.
        self.live: set[str] = set()
        self.ended: dict[str, str] = {}
        self._reaped_at = 0.0

    def setup(self, **info):  # noqa: ANN001 — also runs when a restored sweep starts again
        self._session()

    def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.live.add(trial.trial_id)

    def on_trial_restore(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.live.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        epochs = trial.config.get("train.epochs", self.default_epochs)
        line = (f"  {trial.trial_id}  epoch {result.get('epoch')}/{epochs}  "
                f"loss {result.get('train/dice_loss', float('nan')):.3f}  "
                f"val/dice {result.get('val/dice', float('nan')):.3f}")
        if "test/iou" in result:
            line += f"  test/iou {result['test/iou']:.3f}"
        self.log(line + f"   [{done}/{self.total} trials done]")

    def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.ended[trial.trial_id] = "TERMINATED"
        r = trial.last_result or {}
        how = "completed" if "test/iou" in r else f"stopped by ASHA after epoch {r.get('epoch')}"
        self.log(f"  {trial.trial_id}  {how}")

    def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
        self.ended[trial.trial_id] = "ERROR"
        self.log(f"  {trial.trial_id}  ERROR (see {trial.path or 'the trial folder'}/error.txt)")

    def on_experiment_end(self, trials, **info):  # noqa: ANN001
        def status(t) -> str:  # noqa: ANN001
            if t.trial_id in self.ended:
                return self.ended[t.trial_id]
            if t.trial_id in self.live or t.status not in ("TERMINATED", "ERROR"):
                return "INTERRUPTED"  # started here and never completed, or never started
            return t.status  # ended in an earlier session of a resumed sweep

        FINAL_STATUSES[self.sweep_id] = {t.trial_id: status(t) for t in trials}


def run_sweep(cfg: ExperimentConfig, sweep: SweepContext, *, address: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Run (or resume) the Tuner until it ends or is interrupted; returns trial id -> Tune status.

    `TERMINATED` trials ended normally, `ERROR` ones failed; any other status means the sweep
    was interrupted (Ctrl-C) with that trial unfinished, and `--resume` continues it.
    """
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    # Our ProgressPrinter replaces Tune's status output; the legacy reporter honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Short trials checkpoint every few seconds; Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Local Ray, RAY_ADDRESS or `address`; re-reads the auth token (segtune.cluster.connect).
    started_ray = connect(address)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        searcher = None
        if s.searcher == "optuna":
            # TPE's random start-up phase defaults to 10 trials; a short sweep would never leave it.
            sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=max(2, s.num_samples // 3))
            searcher = OptunaSearch(sampler=sampler)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(cfg),
                                   grace_period=s.grace_period, reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg.model_dump(), sweep=sweep),
                                        trial_resources(cfg))
        progress = TrialProgress(sweep.sweep_id, s.num_samples, cfg.train.epochs, log,
                                 multi_worker=cfg.resources.workers > 1)
        path = experiment_dir(cfg, sweep.sweep_id)
        if tune.Tuner.can_restore(path):
            log(f"resuming the Tune experiment in {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True)
            tuner.fit()
            return FINAL_STATUSES.pop(sweep.sweep_id)
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(s.space),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent,
                                        # A finished trial's worker runs the next one (the function
                                        # trainable's reset_config): no new process, no re-import of
                                        # torch. Not for multi-worker trials: their driver outlives
                                        # the last report while Ray Train stops its workers.
                                        reuse_actors=cfg.resources.workers == 1),
            run_config=tune.RunConfig(
                name=f"{cfg.name}-{sweep.sweep_id}", storage_path=storage_uri(s.storage_path),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints,
                                                        checkpoint_score_attribute=s.metric,
                                                        checkpoint_score_order=s.mode),
                callbacks=[progress], verbose=0,
            ),
        )
        tuner.fit()
        return FINAL_STATUSES.pop(sweep.sweep_id)
    finally:
        if started_ray:
            ray.shutdown()
