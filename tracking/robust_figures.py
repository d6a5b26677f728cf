"""The prompt-robustness matrix on MLflow: metrics, a CSV table and a heatmap on a run.

A robustness score is a checkpoint's mean IoU under one eval prompt kind (`robust/<kind>/iou`)
or after `n` corrective clicks (`robust/clicks_<n>/iou`). A scored run carries those metrics,
the tags below, and under `robustness/` the table as CSV (one row per trained checkpoint and
eval prompt) and a heatmap: rows the train prompt of each scored trial, columns the eval
prompts. A sweep's parent run carries the same two files across its finalists.
segtune computes the scores (segtune.prompt_matrix); this module only writes and reads them.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tracking.figures import _plt
from tracking.redact import redact

PREFIX = "robust/"
ARTIFACTS = "robustness"  # the folder of a run's CSV and heatmap
CSV_NAME, HEATMAP_NAME = "robustness.csv", "robustness.png"
SPLIT, SAMPLES = "segtune.robust.split", "segtune.robust.samples"  # what the scores were measured on


@dataclass
class Row:
    """One cell of the matrix: a trained checkpoint scored under one eval prompt."""

    run_id: str
    trial_id: str
    train_prompt: str
    eval_prompt: str  # a prompt kind, or clicks_<n>
    iou: float
    dice: float | None
    samples: int
    split: str


def metric_key(eval_prompt: str) -> str:
    """`robust/<eval_prompt>/iou`."""
    return f"{PREFIX}{eval_prompt}/iou"


def read_scores(metrics: dict[str, float]) -> dict[str, float]:
    """A run's robustness IoUs by eval prompt, from its metrics."""
    return {k[len(PREFIX):-len("/iou")]: v for k, v in metrics.items() if k.startswith(PREFIX) and k.endswith("/iou")}


def write_csv(rows: list[Row], path: Path) -> Path:
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=[fld.name for fld in fields(Row)])
        out.writeheader()
        for row in rows:
            out.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    return path


def plot_heatmap(rows: list[Row], path: Path, title: str) -> Path:
    """IoU per (trained checkpoint, eval prompt): one row per run, labelled with its train prompt
    (and its trial when several are shown); empty cells where a run has no such score."""
    plt = _plt()
    runs = list(dict.fromkeys(r.run_id for r in rows))
    cols = list(dict.fromkeys(r.eval_prompt for r in rows))
    value = {(r.run_id, r.eval_prompt): r.iou for r in rows}
    first = {r.run_id: r for r in reversed(rows)}
    labels = [first[run].train_prompt + (f" ({first[run].trial_id or run[:8]})" if len(runs) > 1 else "")
              for run in runs]
    grid = [[value.get((run, c), math.nan) for c in cols] for run in runs]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.6 * len(runs) + 2))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("eval prompt")
    ax.set_ylabel("train prompt")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="IoU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_tables(client: MlflowClient, run_id: str, rows: list[Row], title: str) -> None:
    """The CSV and the heatmap of `rows` under `robustness/` of a run."""
    with tempfile.TemporaryDirectory(prefix="segtune-robust-") as tmp:
        write_csv(rows, Path(tmp) / CSV_NAME)
        plot_heatmap(rows, Path(tmp) / HEATMAP_NAME, title)
        client.log_artifacts(run_id, tmp, ARTIFACTS)


def log_scores(uri: str, run_id: str, rows: list[Row], title: str) -> None:
    """Record one scored checkpoint on its run: `robust/<prompt>/iou` metrics, the split and
    sample count as tags, the CSV and the heatmap (a single row)."""
    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(r.eval_prompt), r.iou, now, 0) for r in rows]
    client.log_batch(run_id, metrics=metrics)
    if rows:
        client.set_tag(run_id, SPLIT, rows[0].split)
        client.set_tag(run_id, SAMPLES, str(rows[0].samples))
    log_tables(client, run_id, rows, redact(title))
