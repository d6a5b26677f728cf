"""The sweep's searcher: Optuna, with segtune's rules on what it may launch.

`SweepSearcher` wraps a Tune `Searcher` (OptunaSearch) the way Tune's own `ConcurrencyLimiter`
does, and adds three rules:

- a configuration that already finished (a warm start's trial, segtune.warm_start, or one of
  this sweep) is not launched again: when Optuna proposes one, the wrapper tells Optuna its known
  value under a side trial id and asks again (up to `MAX_REPEATS` times; then the space is taken
  as exhausted and no new trial starts);
- once the sweep's budget is spent (segtune.budget's ledger), `suggest` answers
  `Searcher.FINISHED`: Tune launches no new trial and lets the running ones finish;
- the warm start's completed trials reach Optuna before its first suggestion: tune.py hands them
  to OptunaSearch as `points_to_evaluate` with `evaluated_rewards` (Optuna's `add_trial`), and
  to this wrapper as finished configurations.

Tune calls the wrapper with its own trial ids; a trial proposed after side ids keeps a map to
the inner id, so its results reach Optuna's trial.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.tune.search import Searcher

from segtune.budget import LEDGERS
from segtune.warm_start import point_key

MAX_REPEATS = 32  # Optuna proposals of finished configurations in a row before the space counts as done


class SweepSearcher(Searcher):
    """A Searcher with segtune's rules (see the module's docstring)."""

    def __init__(self, searcher: Searcher, sweep_id: str, finished: dict[tuple, float] | None = None) -> None:
        self.searcher, self.sweep_id = searcher, sweep_id
        self.finished: dict[tuple, float] = dict(finished or {})  # configuration key -> metric value
        self.keys: dict[str, tuple] = {}  # Tune trial id -> its configuration's key
        self.inner: dict[str, str] = {}  # Tune trial id -> the inner searcher's id, where they differ
        self.side = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def _log(self, line: str) -> None:
        if (ledger := LEDGERS.get(self.sweep_id)) is not None:
            ledger.log(line)

    def suggest(self, trial_id: str) -> dict | str | None:
        ledger = LEDGERS.get(self.sweep_id)
        if ledger is not None and ledger.exhausted():
            return Searcher.FINISHED
        inner_id = trial_id
        for _ in range(MAX_REPEATS):
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = point_key(config)
            if key not in self.finished:
                self.keys[trial_id] = key
                if inner_id != trial_id:
                    self.inner[trial_id] = inner_id
                return config
            # Already finished: Optuna learns its value again and proposes something else.
            self.searcher.on_trial_complete(inner_id, result={self.searcher.metric: self.finished[key]})
            self.side += 1
            inner_id = f"{trial_id}-seen{self.side}"
        self._log(f"the searcher proposed {MAX_REPEATS} configurations in a row that already finished; "
                  "taking the search space as exhausted, no new trials")
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(self.inner.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(self.inner.get(trial_id, trial_id), result=result, error=error)
        value = (result or {}).get(self.searcher.metric)
        if not error and value is not None and trial_id in self.keys:
            self.finished[self.keys[trial_id]] = value

    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False, pruned: bool = False,
                            intermediate_values: list[float] | None = None) -> None:
        self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)
        if not error:
            self.finished[point_key(parameters)] = value

    # Tune saves a wrapper (anything with a `searcher` attribute) by get_state/set_state and the
    # searcher inside it by its own save_to_dir, as it does ConcurrencyLimiter.
    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)
