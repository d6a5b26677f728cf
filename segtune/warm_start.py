"""Warm starts: finished trials of earlier sweeps, read back from MLflow, as completed trials
for the searcher (`segtune sweep FILE --warm-start EXPERIMENT|auto`).

A trial qualifies when it ran the same model (`segtune.model`), dataset (`segtune.dataset`),
freeze policy (param `model.train`) and training prompt (param `prompt.train`), in any sweep of
the experiment, on any cluster, and ended FINISHED with the sweep's metric (`search.metric`: its
last value is what Tune gave Optuna when that trial ended; a trial stopped early by ASHA counts
with its last value, as in its own sweep). Its params are mapped onto the current
`search.space`; a trial missing a dimension, or with a value outside it, is reported and
skipped. The searcher (segtune.searcher) tells Optuna the rest before its first suggestion and
does not launch a configuration that already finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from segtune.config import ExperimentConfig, SearchDim
from segtune.errors import ConfigError


@dataclass
class WarmStart:
    """Completed trials for the searcher, in the current search space."""

    experiment: str
    points: list[dict[str, Any]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why

    def record(self) -> dict[str, Any]:
        """What the sweep run keeps of it (its JSON artifact)."""
        return {"experiment": self.experiment, "runs": [
            {"run_id": r, "params": p, "value": v} for r, p, v in zip(self.run_ids, self.points, self.values, strict=True)],
            "skipped": self.skipped}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def in_space(key: str, text: str, dim: SearchDim) -> tuple[Any, str | None]:
    """A logged param's value as a point of `dim` (None and why, when it is not one)."""
    if dim.kind == "choice":
        for c in dim.choice or []:
            if str(c) == text or (_number(str(c)) is not None and _number(str(c)) == _number(text)):
                return c, None
        return None, f"{key}={text} is not one of {dim.choice}"
    value = _number(text)
    lo, hi = dim.args
    if value is None or not lo <= value <= hi:
        return None, f"{key}={text} is outside [{lo:g}, {hi:g}]"
    if dim.kind == "randint":
        if value != int(value):
            return None, f"{key}={text} is not an integer"
        return int(value), None
    return value, None


def point_key(point: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A configuration's identity: the same values (4 and 4.0 alike) make the same key."""
    def norm(v: Any) -> Any:
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)

    return tuple(sorted((k, norm(v)) for k, v in point.items()))


def load(cfg: ExperimentConfig, experiment: str, log: Callable[[str], None] = print) -> WarmStart:
    """The finished trials of `experiment` that can seed a sweep of `cfg` (see the module's docstring)."""
    from tracking.runs import finished_trial_runs

    space, metric = cfg.search.space, cfg.search.metric
    runs = finished_trial_runs(cfg.tracking.uri, experiment,
                               tags={"segtune.model": cfg.model.key, "segtune.dataset": cfg.dataset.name},
                               params={"model.train": cfg.model.freeze_policy, "prompt.train": cfg.prompt.train})
    if runs is None:
        if experiment != cfg.tracking.experiment:  # a new sweep's own experiment has no history yet
            from tracking.redact import redact

            raise ConfigError(f"--warm-start {experiment}: there is no MLflow experiment {experiment!r} at "
                              f"{redact(cfg.tracking.uri)}; name the experiment of the earlier sweeps, or "
                              "`auto` for this file's tracking.experiment.")
        runs = []
    warm = WarmStart(experiment)
    seen: set[tuple] = set()
    for run in runs:
        rid, params = run.info.run_id, run.data.params
        point, why = {}, None
        for key, dim in space.items():
            if key not in params:
                why = f"it has no param {key}"
                break
            point[key], why = in_space(key, params[key], dim)
            if why is not None:
                break
        value = run.data.metrics.get(metric)
        if why is None and (value is None or not math.isfinite(value)):
            why = f"it has no {metric}"
        if why is None and point_key(point) in seen:
            why = "the same configuration finished in an earlier run already given"
        if why is not None:
            warm.skipped[rid] = why
            continue
        seen.add(point_key(point))
        warm.points.append(point)
        warm.values.append(float(value))
        warm.run_ids.append(rid)
    log(f"warm start from experiment {experiment!r}: {len(warm.points)} finished trial(s) of {cfg.model.key} on "
        f"{cfg.dataset.name} (policy {cfg.model.freeze_policy}, prompt {cfg.prompt.train}) given to the searcher"
        + (f", {len(warm.skipped)} skipped" if warm.skipped else ""))
    for rid, why in warm.skipped.items():
        log(f"  warm start: skipped run {rid}: {why}")
    return warm
