"""`segtune robustness` and a sweep's finalists: the prompt-robustness matrix on MLflow runs.

`robustness(uri, source)` scores a trained checkpoint (a run id: its `checkpoints/best`; or a
registered `models:/NAME@ALIAS`, `NAME@ALIAS`, `NAME/VERSION`) under every prompt kind its model
takes and with corrective clicks (segtune.prompt_matrix), on the data its own config names.
`score_finalists` does the same after a sweep for its `search.finalists` best trials.

Where the scores go: on the scored run itself, not on a run of their own. `robust/<kind>/iou`
then sits beside the trial's `val/dice_best` in MLflow's run table and compare view, `promote
--min-prompt-iou` reads it off the run it promotes, and the run tree keeps its levels (a child
under a trial would read as a repeat's member). A registered model's scores go on the trial
run it was promoted from. Scoring again logs the metrics again: MLflow shows the latest, and
keeps the history. The sweep's parent run carries the finalists' CSV and heatmap.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from segtune.config import ExperimentConfig
from segtune.errors import CheckpointError, ConfigError, SegtuneError
from segtune.prepare import Log, prepare_run_data
from segtune.prompt_matrix import Matrix, record, score_matrix
from tracking.robust_figures import Row


@dataclass
class RobustResult:
    run_id: str
    matrix: Matrix
    cfg: ExperimentConfig
    rows: list[Row] = field(default_factory=list)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def source_of(ref: str) -> tuple[str | None, str | None]:
    """RUN_OR_MODEL as (run id, model URI): `models:/...`, `NAME@ALIAS` and `NAME/VERSION` are
    registered models, anything else a run id."""
    if ref.startswith("models:/"):
        return None, ref
    if "@" in ref or "/" in ref:
        return None, f"models:/{ref}"
    return ref, None


def score_run(uri: str, run_id: str | None = None, *, model_uri: str | None = None, split: str = "val",
              sample: int | None = None, log: Log = print) -> RobustResult:
    """Score one checkpoint (a run's best, or a registered model's) and record it on its run."""
    from segtune.checkpoint import load_model
    from segtune.sources import fetch_checkpoint

    with tempfile.TemporaryDirectory(prefix="segtune-robust-") as tmp:
        path, source, source_run = fetch_checkpoint(uri, checkpoint=None, run_id=run_id, model_uri=model_uri,
                                                    tmp=Path(tmp))
        model, cfg = load_model(path)
    if source_run is None:
        raise CheckpointError(f"{source}: the registered version names no run it came from (no segtune.run_id "
                              "tag); score the trial run instead: segtune robustness RUN_ID.")
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(uri).get_run(source_run).data.tags
    # A member of a trial with repeats is scored on the sweep's split (and its fold), as it trained.
    store, _ = prepare_run_data(cfg, tags, split, log)
    cap = sample if sample is not None else cfg.dataset.max_eval
    matrix = score_matrix(model.to(_device()), cfg, store, split=split, sample=cap, line=log)
    trial_id = tags.get("segtune.trial_id", "")
    rows = record(uri, source_run, matrix, cfg, trial_id)
    return RobustResult(source_run, matrix, cfg, rows)


def robustness(uri: str, ref: str, *, split: str = "val", sample: int | None = None, log: Log = print) -> RobustResult:
    """`segtune robustness RUN_OR_MODEL`: score, record on the run, print the matrix."""
    from tracking.server import check_server
    from tracking.urls import run_url_of

    if split not in ("val", "test"):
        raise ConfigError(f"--split {split!r}: expected val (what promotion gates read) or test.")
    check_server(uri)
    run_id, model_uri = source_of(ref)
    result = score_run(uri, run_id, model_uri=model_uri, split=split, sample=sample, log=log)
    m = result.matrix
    log(f"{result.cfg.model.key} trained with {result.cfg.prompt.train} prompts, IoU on {m.samples} {m.split} "
        "samples by eval prompt:")
    for col, value in m.iou.items():
        log(f"  {col:<14} {value:.4f}")
    log(f"logged as robust/<prompt>/iou on run {result.run_id}: {run_url_of(uri, result.run_id) or uri}")
    return result


def score_finalists(cfg: ExperimentConfig, sweep_id: str, parent_run_id: str, log: Log = print) -> list[RobustResult]:
    """After a sweep: the matrix of its `search.finalists` best finished trials by
    `val/dice_best`, each on its run, and one heatmap across them on the sweep's parent run.

    A finalist that cannot be scored (no checkpoint, data gone) is skipped with a line: the
    sweep's own results stand.
    """
    from tracking.errors import TrackingError
    from tracking.registry import best_member
    from tracking.robust_figures import log_tables
    from tracking.runs import PRUNED, UNREACHABLE, trial_runs

    if cfg.search.finalists == 0:
        return []
    uri = cfg.tracking.uri
    metric = "val/dice_best"
    try:
        runs = [r for r in trial_runs(uri, cfg.tracking.experiment, sweep_id)
                if r.info.status == "FINISHED" and metric in r.data.metrics and r.data.tags.get(PRUNED) != "true"]
    except (TrackingError, *UNREACHABLE) as err:
        log(f"robustness of the finalists skipped: {err}")
        return []
    runs.sort(key=lambda r: r.data.metrics[metric], reverse=True)
    results: list[RobustResult] = []
    for run in runs[: cfg.search.finalists]:
        rid = run.info.run_id
        try:
            # A trial with repeats keeps its checkpoints on its members: its best member is the
            # one promotion registers, so that is the one scored.
            member = best_member(uri, run)
            results.append(score_run(uri, member.info.run_id if member else rid, sample=cfg.dataset.max_eval,
                                     log=log))
        except (SegtuneError, TrackingError, *UNREACHABLE) as err:
            log(f"robustness of trial {run.data.tags.get('segtune.trial_id', rid)} skipped: {err}")
            continue
        m = results[-1].matrix
        log(f"robustness of trial {run.data.tags.get('segtune.trial_id', rid)}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in m.iou.items()))
    if results:
        from mlflow.tracking import MlflowClient

        rows = [row for r in results for row in r.rows]
        try:
            log_tables(MlflowClient(uri), parent_run_id, rows, f"sweep {sweep_id}: {len(results)} finalist{'' if len(results) == 1 else 's'}, "
                       f"IoU by train and eval prompt ({results[0].matrix.split})")
        except UNREACHABLE as err:
            log(f"the finalists' robustness heatmap was not logged on the sweep's run: {err}")
    return results
