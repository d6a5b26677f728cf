"""Ray Tune for segtune: search spaces, trial resources, the Tuner, trial progress.

`tune_trials` builds a `tune.Tuner` from the experiment's `search:` and `resources:` sections
(OptunaSearch with TPE, ASHA) and runs it against a local Ray (or a cluster with `address`).
Each trial (`_trial`) opens its own MLflow child run under the sweep's parent run — there is
no Ray MLflow callback, so there is exactly one run per trial — and calls `train.run_trial`;
a trial with `resources.workers` above 1 runs as a Ray Train trainer (segtune.distributed), and
one with `search.repeats` runs its K members (segtune.repeats): one trial to Tune all the same.
Each trial logs its cost (segtune.budget) as it goes; the searcher (segtune.searcher) is seeded
with a warm start's finished trials, launches no finished configuration again, and stops
launching once `search.budget_gpu_hours` is spent.
`build_tuner` and `ray_session` are shared with the prompt search (segtune.prompt_search).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from segtune.budget import BudgetClock, cost_metrics, open_ledger, unit
from segtune.checkpoint import first_intact
from segtune.cluster import connect, experiment_dir, storage_uri
from segtune.config import ExperimentConfig, SearchDim, apply_params, validate
from segtune.distributed import release_orphaned_groups, run_distributed
from segtune.errors import ConfigError
from segtune.repeats import MEMBER_DIR, run_repeats
from segtune.searcher import SweepSearcher
from segtune.train import TrialContext, run_trial
from segtune.trial import SweepContext, open_sweep_trial, tracked, trial_client_env, trial_log
from segtune.warm_start import WarmStart, point_key


def tune_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """YAML search space -> Tune distributions. `randint: [a, b]` includes b (Optuna's convention)."""
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


def _trial(params: dict[str, Any], *, base: dict, shared: SweepContext) -> None:
    """One Tune trial: the sampled params applied to the base config, then `run_trial`."""
    trial_client_env()
    started = time.monotonic()
    cfg = apply_params(validate(base, "sweep config"), params)
    tctx = tune.get_context()
    trial_id, workdir = tctx.get_trial_id(), Path(tctx.get_trial_dir())
    with trial_log(workdir) as log:
        if cfg.resources.workers > 1:
            try:
                run_distributed(cfg, params, base, shared, trial_id, log)
            finally:
                _log_distributed_cost(cfg, shared, trial_id, time.monotonic() - started, log)
            return
        node_id = ray.get_runtime_context().get_node_id()
        tracker = open_sweep_trial(cfg, shared, trial_id, node_id=node_id)
        members = cfg.search.repeats.k if cfg.search.repeats is not None else 0
        resume_from = _restorable(tune.get_checkpoint(), workdir / "restored", log, members)

        def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
            # The cost so far, on the run before Tune sees the epoch: this report may be the last.
            cost = cost_metrics(cfg, time.monotonic() - started, tracker.metrics_at_open)
            tracker.log_metrics(cost, step=tracker.next_step("cost/gpu_hours"))
            tracker.flush()
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

        if members:
            with tracked(tracker, passes=(SystemExit,)):
                run_repeats(cfg, shared, trial_id, tracker, workdir, report, resume_from=resume_from,
                            node_id=node_id, log=log)
            return

        ctx = TrialContext(store=Path(shared.store), workdir=workdir, tracker=tracker, report_epoch=report,
                           resume_from=resume_from, log=log)
        # Tune stops a trial by raising SystemExit inside report(): ASHA pruned it, or the sweep is
        # being interrupted. Only the driver knows which, so it closes the run (commands.run_sweep).
        with tracked(tracker, passes=(SystemExit,)):
            run_trial(cfg, ctx)


def _log_distributed_cost(cfg: ExperimentConfig, shared: SweepContext, trial_id: str, seconds: float,
                          log: Callable[[str], None]) -> None:
    """A multi-worker trial's cost, from the process that drove its trainer (rank 0 holds the run)."""
    from tracking.runs import UNREACHABLE, log_trial_values

    try:
        log_trial_values(cfg.tracking.uri, cfg.tracking.experiment, shared.sweep_id, trial_id,
                         cost_metrics(cfg, seconds))
    except UNREACHABLE as err:
        log(f"could not log this trial's cost ({err.__class__.__name__}); the sweep's sums leave it out")


def _restorable(restored: Any, local: Path, log: Callable[[str], None], members: int = 0) -> Path | None:
    """Download Tune's latest checkpoint of this trial, or an older kept one if it is damaged
    (with `members`, one whose every `member_<i>/` checkpoint is intact)."""
    if restored is None:
        return None
    import pyarrow.fs

    fs, parent = restored.filesystem, restored.path.rsplit("/", 1)[0]
    kept = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    candidates = [restored.path] + sorted((p for p in kept if p != restored.path), reverse=True)
    local_dirs = []
    for n, path in enumerate(candidates):
        target = local / f"{n}"
        tune.Checkpoint(path, filesystem=fs).to_directory(str(target))
        local_dirs.append(target)
    if members:
        found = next((d for d in local_dirs if all(first_intact([d / MEMBER_DIR.format(i)], log) is not None
                                                   for i in range(members))), None)
    else:
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

    def on_step_begin(self, iteration, trials, **info):
        # Stopped multi-worker trials leave Ray Train's placement groups behind (segtune.distributed).
        if getattr(self, "multi_worker", False) and time.monotonic() - self._reaped_at > _REAP_EVERY_S:
            self._reaped_at = time.monotonic()
            if n := release_orphaned_groups(ray.get_runtime_context().get_job_id()):
                self.log(f"  released {n} placement group(s) of stopped multi-worker trials")

    def _session(self) -> None:
        # Trials this driver session started, and how they ended. Tune marks the trials it stops
        # on Ctrl-C TERMINATED too; these sets tell a finished trial from an interrupted one.
        self.live: set[str] = set()
        self.ended: dict[str, str] = {}
        self._reaped_at = 0.0

    def setup(self, **info):
        self._session()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.live.add(trial.trial_id)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.live.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        epochs = trial.config.get("train.epochs", self.default_epochs)
        line = (f"  {trial.trial_id}  epoch {result.get('epoch')}/{epochs}  "
                f"loss {result.get('train/dice_loss', float('nan')):.3f}  "
                f"val/dice {result.get('val/dice', float('nan')):.3f}")
        if "test/iou" in result:
            line += f"  test/iou {result['test/iou']:.3f}"
        self.log(line + f"   [{done}/{self.total} trials done]")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "TERMINATED"
        r = trial.last_result or {}
        how = "completed" if "test/iou" in r else f"stopped by ASHA after epoch {r.get('epoch')}"
        self.log(f"  {trial.trial_id}  {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = "ERROR"
        self.log(f"  {trial.trial_id}  ERROR (see {trial.path or 'the trial folder'}/error.txt)")

    def on_experiment_end(self, trials, **info):
        def status(t) -> str:
            if t.trial_id in self.ended:
                return self.ended[t.trial_id]
            if t.trial_id in self.live or t.status not in ("TERMINATED", "ERROR"):
                return "INTERRUPTED"  # started here and never completed, or never started
            return t.status  # ended in an earlier session of a resumed sweep

        FINAL_STATUSES[self.sweep_id] = {t.trial_id: status(t) for t in trials}


# Driver-side functions that `OnTrialEnd` callbacks call, by key: Tune pickles its callbacks
# with the experiment's state, and a progress bar (a live display, locks) does not pickle.
_ON_TRIAL_END: dict[str, Callable[[], None]] = {}


class OnTrialEnd(tune.Callback):
    """Calls a driver-side function each time a trial completes or fails (e.g. a progress bar's
    advance); see `on_trial_end`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._call()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call()

    def _call(self) -> None:
        if (fn := _ON_TRIAL_END.get(self.key)) is not None:
            fn()


@contextmanager
def on_trial_end(fn: Callable[[], None]) -> Iterator[OnTrialEnd]:
    """A Tune callback that calls `fn` as each trial ends, while the block runs."""
    key = uuid.uuid4().hex
    _ON_TRIAL_END[key] = fn
    try:
        yield OnTrialEnd(key)
    finally:
        del _ON_TRIAL_END[key]


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one driver command: connected (a local Ray, RAY_ADDRESS or `address`, with the
    auth token read afresh; segtune.cluster.connect), quiet, and shut down after if started here."""
    # Our progress lines replace Tune's status output; the legacy reporter honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Short trials checkpoint every few seconds; Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = connect(address)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def build_tuner(cfg: ExperimentConfig, trainable: Any, *, name: str, param_space: dict[str, Any],
                tune_config: tune.TuneConfig, checkpoint_config: tune.CheckpointConfig | None = None,
                callbacks: list[tune.Callback] | None = None) -> tune.Tuner:
    """A Tuner with segtune's run settings: storage under `search.storage_path`, retries
    (`search.max_failures`), and no Tune status output."""
    return tune.Tuner(
        trainable, param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=name, storage_path=storage_uri(cfg.search.storage_path),
                                  failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                                  checkpoint_config=checkpoint_config, callbacks=callbacks, verbose=0))


def sweep_searcher(cfg: ExperimentConfig, sweep_id: str, warm: WarmStart | None = None) -> SweepSearcher | None:
    """Optuna (TPE, or its random sampler for `searcher: random` with a budget or a warm start)
    under segtune's rules (segtune.searcher); None: Tune's own random search."""
    s = cfg.search
    if s.searcher != "optuna" and warm is None and s.budget_gpu_hours is None:
        return None
    if s.searcher == "optuna":
        # TPE's random start-up phase defaults to 10 trials; a short sweep would never leave it.
        # Warm-start trials count towards it: Optuna counts every completed trial of its study.
        sampler = optuna.samplers.TPESampler(seed=cfg.train.seed, n_startup_trials=max(2, s.num_samples // 3))
    else:
        sampler = optuna.samplers.RandomSampler(seed=cfg.train.seed)
    seeds = ({"points_to_evaluate": warm.points, "evaluated_rewards": warm.values}
             if warm is not None and warm.points else {})
    finished = {point_key(p): v for p, v in zip(seeds.get("points_to_evaluate", []),
                                                seeds.get("evaluated_rewards", []), strict=True)}
    return SweepSearcher(OptunaSearch(sampler=sampler, **seeds), sweep_id, finished)


def tune_trials(cfg: ExperimentConfig, shared: SweepContext, *, address: str | None = None,
                warm: WarmStart | None = None, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run (or resume) the sweep's Tuner until it ends or is interrupted; returns trial id -> status.

    `TERMINATED` trials ended normally, `ERROR` ones failed; any other status means the sweep
    was interrupted (Ctrl-C) with that trial unfinished, and `--resume` continues it. `warm`:
    finished trials of earlier sweeps for the searcher (segtune.warm_start; not on resume, whose
    searcher comes back with its state). Whether the budget stopped it: `budget.budget_stopped`.
    """
    s = cfg.search
    if s.repeats is not None and cfg.resources.workers > 1:
        raise ConfigError(f"search.repeats: the {s.repeats.k} members of a trial take turns in its one process; "
                          f"resources.workers={cfg.resources.workers} (data-parallel trials) cannot have "
                          "members. Set resources.workers: 1 or leave search.repeats out.")
    with ray_session(address):
        searcher = sweep_searcher(cfg, shared.sweep_id, warm)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(cfg),
                                   grace_period=s.grace_period, reduction_factor=s.reduction_factor)
                     if s.scheduler == "asha" else FIFOScheduler())
        trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg.model_dump(), shared=shared),
                                        trial_resources(cfg))
        progress = TrialProgress(shared.sweep_id, s.num_samples, cfg.train.epochs, log,
                                 multi_worker=cfg.resources.workers > 1)
        path = experiment_dir(cfg, shared.sweep_id)
        resuming = tune.Tuner.can_restore(path)
        spent = 0.0
        if resuming and s.budget_gpu_hours is not None:  # what the earlier sessions' trials logged
            from tracking.runs import sweep_costs

            spent = sweep_costs(cfg.tracking.uri, cfg.tracking.experiment, shared.sweep_id)[f"cost/{unit(cfg)}_hours"]
        open_ledger(cfg, shared.sweep_id, spent_before=spent, log=log)
        if resuming:
            log(f"resuming the Tune experiment in {path}")
            tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True).fit()
            return FINAL_STATUSES.pop(shared.sweep_id)
        tuner = build_tuner(
            cfg, trainable, name=f"{cfg.name}-{shared.sweep_id}", param_space=tune_space(s.space),
            tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=searcher, scheduler=scheduler,
                                        num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent,
                                        # A finished trial's worker runs the next one (the function
                                        # trainable's reset_config): no new process, no re-import of
                                        # torch. Not for multi-worker trials: their driver outlives
                                        # the last report while Ray Train stops its workers.
                                        reuse_actors=cfg.resources.workers == 1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.keep_checkpoints,
                                                    checkpoint_score_attribute=s.metric,
                                                    checkpoint_score_order=s.mode),
            callbacks=[progress, BudgetClock(shared.sweep_id)])
        tuner.fit()
        return FINAL_STATUSES.pop(shared.sweep_id)
