"""What mattered in a sweep: hyperparameter importance, the trials' parallel coordinates and a
narrowed `search.space` for the next sweep, logged on the sweep's parent run at its end.

The trials are read back from MLflow (tracking.insight_figures.read_trials): every FINISHED trial
run, a pruned one with the best value it reached, by the metric the sweep ranked on; failed and
killed trials are left out. From them:

- **importance** (`importance/<param>` metrics, `insight/importance.png`): Optuna's
  PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`) on an in-memory study holding the
  trials, normalised by `optuna.importance.get_param_importances` to sum to 1. PED-ANOVA, not
  fANOVA: it needs no random forest (fANOVA needs scikit-learn, which segtune does not install),
  it is meant for few trials (a sweep has 8 to 16), and it answers the question a narrowed space
  asks: which parameters set the top trials apart from the rest. Its top set is the one the
  narrowing uses, the top quartile (at least 2 trials).
- **parallel coordinates** (`insight/parallel_coordinates.png`): one line per trial across the
  searched parameters (log axes for loguniform) and the objective, coloured by the objective.
- **a suggested space** (`insight/suggested_space.yaml`), by the rule in `RULE`.

With fewer than `MIN_TRIALS` finished trials only the parallel coordinates are drawn; a space of
one dimension gets no importance (it would be 1 by definition). What was skipped, and why, is a
line in the sweep's log and the run's `segtune.insight.skipped` tag; nothing here fails a sweep.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from segtune.config import ExperimentConfig, SearchDim
from segtune.prepare import Log
from tracking.insight_figures import EVALUATOR, SKIPPED, Axis, log_insight, read_trials

MIN_TRIALS = 3  # fewer: no importance, no narrowing (a top quartile of two trials is both of them)
WIDEN = 0.1  # of the original range, on each side of what the top trials span
RULE = ("the top quartile of the finished trials by {metric} ({mode}; at least 2 trials, here {k} of {n}); "
        "each numeric dimension: the range those trials span, widened by 10% of the original range on each "
        "side (in log10 for loguniform; randint rounded outward to integers), rounded outward to 3 "
        "significant digits and clipped to the original bounds; each choice: the choices those trials used")


@dataclass
class Insight:
    """What was logged on the sweep's run, and why the rest was not."""

    trials: int
    importance: dict[str, float] = field(default_factory=dict)
    suggested: dict[str, SearchDim] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def param_value(dim: SearchDim, text: str) -> Any:
    """A param as MLflow holds it (a string) back as a value of `dim`; None if it is not one."""
    try:
        if dim.kind == "choice":
            match = [c for c in dim.choice if str(c) == text]
            if not match:  # choice [1, 2] for a float field is logged as 1.0
                match = [c for c in dim.choice if not isinstance(c, (bool, str)) and float(c) == float(text)]
            return match[0] if match else None
        value = int(float(text)) if dim.kind == "randint" else float(text)
    except (TypeError, ValueError):
        return None
    low, high = dim.args
    return value if low <= value <= high else None


def distributions(space: dict[str, SearchDim]) -> dict[str, Any]:
    """`search.space` as Optuna distributions (as segtune.tune.tune_space maps it for Tune)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    make = {
        "loguniform": lambda a: FloatDistribution(a[0], a[1], log=True),
        "uniform": lambda a: FloatDistribution(a[0], a[1]),
        "choice": lambda a: CategoricalDistribution(list(a)),
        "randint": lambda a: IntDistribution(a[0], a[1]),  # inclusive, as the YAML's
    }
    return {key: make[dim.kind](dim.args) for key, dim in space.items()}


def top_count(n: int) -> int:
    """How many trials make the top quartile: at least 2."""
    return max(2, math.ceil(n / 4))


def ranked(points: list[tuple[dict[str, Any], float]], mode: str) -> list[tuple[dict[str, Any], float]]:
    """Best first."""
    return sorted(points, key=lambda p: p[1], reverse=mode == "max")


def importance(space: dict[str, SearchDim], points: list[tuple[dict[str, Any], float]], mode: str) -> dict[str, float]:
    """PED-ANOVA importance of each dimension for reaching the top quartile; sums to 1."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    dists = distributions(space)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        study.add_trials([optuna.trial.create_trial(params=params, distributions=dists, value=value)
                          for params, value in points])
        # (k - 0.5) / n: Optuna keeps the ceil(q * n) best, i.e. exactly the k of the narrowing.
        quantile = (top_count(len(points)) - 0.5) / len(points)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature and few-trials notices
            found = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return {key: float(found.get(key, 0.0)) for key in space}


def _outward(x: float, up: bool) -> float:
    """`x` rounded to 3 significant digits, up or down."""
    if x == 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(abs(x))) - 2)
    return float(f"{(math.ceil(x / step) if up else math.floor(x / step)) * step:.3g}")


def narrow(dim: SearchDim, top: list[Any]) -> SearchDim:
    """One dimension narrowed to what the top trials used (`RULE`)."""
    if dim.kind == "choice":
        return SearchDim(choice=[c for c in dim.choice if c in top])
    low, high = dim.args
    log = dim.kind == "loguniform"
    f = math.log10 if log else float
    margin = WIDEN * (f(high) - f(low))
    lo, hi = f(min(top)) - margin, f(max(top)) + margin
    lo, hi = (10.0 ** lo, 10.0 ** hi) if log else (lo, hi)
    if dim.kind == "randint":
        lo, hi = math.floor(lo), math.ceil(hi)
    else:
        lo, hi = _outward(lo, up=False), _outward(hi, up=True)
    lo, hi = max(low, min(lo, min(top))), min(high, max(hi, max(top)))  # contains the top, inside the original
    return SearchDim(**{dim.kind: (lo, hi)})


def suggest(space: dict[str, SearchDim], points: list[tuple[dict[str, Any], float]], mode: str) -> dict[str, SearchDim]:
    """The narrowed space: each dimension by `narrow` over the top quartile's values."""
    top = ranked(points, mode)[: top_count(len(points))]
    return {key: narrow(dim, [params[key] for params, _ in top]) for key, dim in space.items()}


def space_yaml(suggested: dict[str, SearchDim], rule: str, source: str) -> str:
    """The suggested space as an experiment file's `search.space` block, the rule as comments."""
    lines = [f"# Suggested search.space for the next sweep, {source}.", "# Rule: " + rule + ".",
             "# Paste it over the experiment file's search.space (or --set search.space.<dim>=...).",
             "search:", "  space:"]
    for key, dim in suggested.items():
        value = list(dim.args)
        lines.append(f"    {key}: " + yaml.safe_dump({dim.kind: value}, default_flow_style=True, width=1000).strip())
    return "\n".join(lines) + "\n"


def what_mattered(cfg: ExperimentConfig, sweep_id: str, parent_run_id: str, log: Log = print) -> Insight:
    """Compute and log importance, parallel coordinates and a suggested space on the sweep's run."""
    space, metric, mode = cfg.search.space, cfg.search.metric, cfg.search.mode
    found, left_out = read_trials(cfg.tracking.uri, cfg.tracking.experiment, sweep_id, metric, mode)
    points: list[tuple[dict[str, Any], float]] = []
    for p in found:
        params = {key: param_value(dim, p.params.get(key, "")) for key, dim in space.items()}
        if None in params.values():  # params outside the space (it changed on --resume): not comparable
            left_out += 1
            continue
        points.append((params, p.value))
    out = Insight(trials=len(points))
    if not space:
        out.skipped.append("the sweep searched no dimension")
    elif not points:
        out.skipped.append(f"no finished trial with {metric}" if not found
                           else f"no finished trial whose params fit search.space ({len(found)} did not)")
    if len(points) < MIN_TRIALS and space and points:
        out.skipped.append(f"importance and suggested space: {len(points)} finished trial"
                           f"{'' if len(points) == 1 else 's'}, {MIN_TRIALS} needed")
    elif len(space) == 1 and points:
        out.skipped.append(f"importance: one dimension ({next(iter(space))}) is all that varied")
    enough = len(points) >= MIN_TRIALS and bool(space)
    if enough and len(space) > 1:
        try:
            out.importance = importance(space, points, mode)
        except Exception as err:  # Optuna refusing the trials (e.g. a choice of lists): the rest still stands
            out.skipped.append(f"importance: {type(err).__name__}: {err}")
    yaml_text = None
    if enough:
        out.suggested = suggest(space, points, mode)
        rule = RULE.format(metric=metric, mode=mode, k=top_count(len(points)), n=len(points))
        yaml_text = space_yaml(out.suggested, rule, f"from sweep {sweep_id} of {cfg.name}")
    axes = [_axis(key, dim, [params[key] for params, _ in points]) for key, dim in space.items()]
    tags = {SKIPPED: "; ".join(out.skipped)} if out.skipped else {}
    if out.importance:
        tags[EVALUATOR] = "optuna.importance.PedAnovaImportanceEvaluator"
    out.files = log_insight(cfg.tracking.uri, parent_run_id, title=f"sweep {sweep_id}", metric=metric,
                            importance=out.importance or None, axes=axes if points and space else None,
                            objective=[v for _, v in points], suggested_yaml=yaml_text, tags=tags)
    ranked_imp = ", ".join(f"{k} {v:.2f}" for k, v in sorted(out.importance.items(), key=lambda kv: -kv[1]))
    log(f"what mattered in sweep {sweep_id} ({len(points)} trials"
        + (f", {left_out} left out" if left_out else "") + "): "
        + (f"importance {ranked_imp}; " if ranked_imp else "")
        + (f"logged {', '.join(out.files)}" if out.files else "nothing logged")
        + (f"; skipped {'; '.join(out.skipped)}" if out.skipped else ""))
    return out


def _axis(key: str, dim: SearchDim, values: list[Any]) -> Axis:
    if dim.kind == "choice":
        return Axis(key, [float(dim.choice.index(v)) for v in values], 0.0, float(len(dim.choice) - 1),
                    labels=[str(c) for c in dim.choice])
    low, high = dim.args
    return Axis(key, [float(v) for v in values], float(low), float(high), log=dim.kind == "loguniform")
