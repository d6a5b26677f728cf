"""What mattered in a sweep, on MLflow: its trials read back, importance and parallel coordinates
drawn, and everything logged on the sweep's parent run.

segtune computes the numbers (segtune.insight); this module reads the trials' params and
objective off their runs, draws plain numbers as PNGs, and writes them under `insight/` of the
parent run with the `importance/<param>` metrics and the suggested space's YAML text.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tracking.figures import _plt
from tracking.redact import redact
from tracking.runs import KIND, PRUNED, SWEEP_ID, TRIAL_ID

ARTIFACTS = "insight"  # the folder on the sweep's run
IMPORTANCE_PNG, PARALLEL_PNG, SPACE_YAML = "importance.png", "parallel_coordinates.png", "suggested_space.yaml"
PREFIX = "importance/"
SKIPPED = "segtune.insight.skipped"  # why a part was not logged
EVALUATOR = "segtune.insight.evaluator"  # which importance the metrics hold


@dataclass
class TrialPoint:
    """One finished trial: its params as logged (strings) and the value the sweep ranked it on."""

    run_id: str
    trial_id: str
    params: dict[str, str]
    value: float
    pruned: bool = False


@dataclass
class Axis:
    """One vertical axis of the parallel coordinates: a value per trial between `low` and `high`
    (a choice: its index, `labels` naming each), drawn on a log10 scale when `log`."""

    name: str
    values: list[float]
    low: float
    high: float
    log: bool = False
    labels: list[str] = field(default_factory=list)


def read_trials(uri: str, experiment: str, sweep_id: str, metric: str, mode: str) -> tuple[list[TrialPoint], int]:
    """The sweep's FINISHED trial runs (pruned ones included) with their best `metric` reached;
    returns them and how many trial runs were left out (failed, killed, or with no value).

    The value: `val/dice_best` where the sweep ranked on `val/dice` to the max (the best epoch's,
    whose checkpoint the trial keeps); otherwise, and for a pruned trial that stopped before it
    logged `val/dice_best`, the best of the run's `metric` history.
    """
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], 0
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = 'trial'"),
        order_by=["attributes.start_time ASC"], max_results=1000)
    points, left_out = [], 0
    for run in runs:
        value = None
        if run.info.status == "FINISHED":
            value = run.data.metrics.get("val/dice_best") if (metric, mode) == ("val/dice", "max") else None
            if value is None:
                history = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
                finite = [v for v in history if math.isfinite(v)]
                value = (max(finite) if mode == "max" else min(finite)) if finite else None
        if value is None or not math.isfinite(value):
            left_out += 1
            continue
        points.append(TrialPoint(run.info.run_id, run.data.tags.get(TRIAL_ID, ""), dict(run.data.params),
                                 float(value), run.data.tags.get(PRUNED) == "true"))
    return points, left_out


def plot_importance(importance: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars, the most important parameter on top."""
    plt = _plt()
    names = sorted(importance, key=importance.get)
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(range(len(names)), [importance[n] for n in names], color="#3b75af")
    for i, n in enumerate(names):
        ax.text(importance[n], i, f" {importance[n]:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlim(0, max([*importance.values(), 1e-9]) * 1.15)
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_parallel_coordinates(axes: list[Axis], objective: list[float], metric: str, path: Path,
                              title: str) -> Path:
    """One polyline per trial across `axes` and the objective, coloured by the objective. Each
    axis spans its own [low, high] (the searched bounds); the objective spans its values."""
    plt = _plt()
    lo, hi = min(objective), max(objective)
    cols = [*axes, Axis(metric, objective, lo, hi)]

    def unit(a: Axis, v: float) -> float:
        low, high, v = (math.log10(a.low), math.log10(a.high), math.log10(v)) if a.log else (a.low, a.high, v)
        return (v - low) / (high - low) if high > low else 0.5

    fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2.5, 4.2))
    cmap = plt.get_cmap("viridis")
    for i in sorted(range(len(objective)), key=objective.__getitem__):  # the best drawn last, on top
        colour = cmap((objective[i] - lo) / (hi - lo) if hi > lo else 0.5)
        ax.plot(range(len(cols)), [unit(a, a.values[i]) for a in cols], color=colour, marker="o", alpha=0.85)
    for x, a in enumerate(cols):
        ax.axvline(x, color="grey", lw=0.8)
        if a.labels:  # a choice: its values where they sit on the axis
            for j, label in enumerate(a.labels):
                ax.text(x + 0.04, unit(a, j), label, fontsize=7, va="center", color="dimgrey")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([a.name + ("\n" if a.labels else f"\n[{a.low:.3g}, {a.high:.3g}]")
                        + (" log" if a.log else "") for a in cols], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(scale, ax=ax, label=metric)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_insight(uri: str, run_id: str, *, title: str, metric: str, importance: dict[str, float] | None = None,
                axes: list[Axis] | None = None, objective: list[float] | None = None,
                suggested_yaml: str | None = None, tags: dict[str, str] | None = None) -> list[str]:
    """Log what was computed on the sweep's run: `importance/<param>` metrics and `insight/`
    files (the bar chart, the parallel coordinates, the suggested space). Returns the files."""
    client = MlflowClient(uri)
    title = redact(title)
    if importance:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"{PREFIX}{k}", float(v), now, 0) for k, v in importance.items()])
    with tempfile.TemporaryDirectory(prefix="segtune-insight-") as tmp:
        files = []
        if importance:
            files.append(plot_importance(importance, Path(tmp) / IMPORTANCE_PNG, f"{title}: importance"))
        if axes is not None and objective:
            files.append(plot_parallel_coordinates(axes, objective, metric, Path(tmp) / PARALLEL_PNG,
                                                   f"{title}: {len(objective)} trials"))
        if suggested_yaml is not None:
            files.append(Path(tmp) / SPACE_YAML)
            files[-1].write_text(suggested_yaml)
        if files:
            client.log_artifacts(run_id, tmp, ARTIFACTS)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, redact(value))
    return [f"{ARTIFACTS}/{f.name}" for f in files]
