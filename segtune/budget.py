"""What a sweep's trials cost, and the budget that stops launching new ones.

A trial costs its GPUs x its wall time (`cost/gpu_hours`); a trial without GPUs logs its CPUs
x its wall time as `cost/cpu_hours` (and `cost/gpu_hours` 0). The resources are the trial's
totals from `resources:` (all workers of a multi-worker trial; a trial with repeats holds its
members in its one process, so its cost covers them). `_trial` (segtune.tune) logs the running
total at every epoch, before reporting to Tune: the last report may stop the trial, and the cost
is on its run by then.

`search.budget_gpu_hours` is counted in the sweep's own unit (`unit`: GPU-hours, or CPU-hours
for a sweep without GPUs). The driver keeps a `Ledger` per sweep: `BudgetClock` (a Tune
callback) notes when each trial starts and ends, and the sweep's searcher (segtune.searcher)
asks `Ledger.spent()` before each new trial: finished trials' cost plus running trials' elapsed
cost. Once it reaches the budget the searcher answers `Searcher.FINISHED`: Tune launches nothing
more and the running trials finish. Tune pickles its callbacks and searcher with the experiment,
so both find the ledger by sweep id in a module global, as segtune.tune's FINAL_STATUSES.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray import tune

from segtune.config import ExperimentConfig


def unit(cfg: ExperimentConfig) -> str:
    """`gpu` when a trial holds GPUs, else `cpu`: what the sweep's cost and budget count."""
    return "gpu" if cfg.resources.gpu > 0 else "cpu"


def rate(cfg: ExperimentConfig) -> float:
    """GPUs (or CPUs, see `unit`) one trial holds: its cost per hour of wall time."""
    return cfg.resources.gpu if cfg.resources.gpu > 0 else cfg.resources.cpu


def cost_metrics(cfg: ExperimentConfig, seconds: float, before: dict[str, float] | None = None) -> dict[str, float]:
    """A trial's cost after `seconds` of wall time, added to what earlier attempts spent (`before`:
    the run's metrics when this attempt reattached)."""
    before = before or {}
    hours = seconds / 3600.0
    out = {"cost/gpu_hours": before.get("cost/gpu_hours", 0.0) + cfg.resources.gpu * hours}
    if cfg.resources.gpu == 0:
        out["cost/cpu_hours"] = before.get("cost/cpu_hours", 0.0) + cfg.resources.cpu * hours
    return out


class Ledger:
    """The driver's account of one sweep: trial start and end times, and the budget."""

    def __init__(self, budget: float | None, rate_: float, unit_: str, *, spent_before: float = 0.0,
                 log: Callable[[str], None] = print) -> None:
        self.budget, self.rate, self.unit, self.log = budget, rate_, unit_, log
        self.spent_before = spent_before  # what earlier sessions of a resumed sweep spent
        self.started: dict[str, float] = {}
        self.finished_s = 0.0
        self.stopped_at: float | None = None  # the spent budget when launching stopped

    def start(self, trial_id: str) -> None:
        self.started.setdefault(trial_id, time.monotonic())

    def end(self, trial_id: str) -> None:
        if (t0 := self.started.pop(trial_id, None)) is not None:
            self.finished_s += time.monotonic() - t0

    def spent(self) -> float:
        """Finished trials' cost plus running trials' elapsed cost, in `unit`-hours."""
        now = time.monotonic()
        seconds = self.finished_s + sum(now - t0 for t0 in self.started.values())
        return self.spent_before + self.rate * seconds / 3600.0

    def exhausted(self) -> bool:
        """True (and said once, in the sweep's log) once the budget is spent."""
        if self.budget is None:
            return False
        if self.stopped_at is None:
            spent = self.spent()
            if spent < self.budget:
                return False
            self.stopped_at = spent
            self.log(f"budget spent: {spent:.4g} of search.budget_gpu_hours={self.budget:g} "
                     f"({self.unit.upper()}-hours); no new trials, {len(self.started)} running trial(s) finish")
        return True


LEDGERS: dict[str, Ledger] = {}


def open_ledger(cfg: ExperimentConfig, sweep_id: str, *, spent_before: float = 0.0,
                log: Callable[[str], None] = print) -> Ledger:
    """The sweep's ledger (replacing one of an earlier session), said in the log when it has a budget."""
    b = cfg.search.budget_gpu_hours
    ledger = LEDGERS[sweep_id] = Ledger(b, rate(cfg), unit(cfg), spent_before=spent_before, log=log)
    if b is not None:
        what = ("GPU-hours" if unit(cfg) == "gpu" else
                "CPU-hours: the trials hold no GPU, so their CPUs x wall time count against it")
        log(f"budget: search.budget_gpu_hours={b:g} in {what}"
            + (f"; {spent_before:.4g} spent before this session" if spent_before else ""))
    return ledger


def budget_stopped(sweep_id: str) -> float | None:
    """The spent budget at which the sweep stopped launching trials (None: it did not); forgets the ledger."""
    ledger = LEDGERS.pop(sweep_id, None)
    return None if ledger is None else ledger.stopped_at


class BudgetClock(tune.Callback):
    """Notes in the sweep's ledger when each trial starts and ends (driver side)."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id = sweep_id

    def _ledger(self) -> Ledger | None:
        return LEDGERS.get(self.sweep_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        if (ledger := self._ledger()) is not None:
            ledger.start(trial.trial_id)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.on_trial_start(iteration, trials, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (ledger := self._ledger()) is not None:
            ledger.end(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)
