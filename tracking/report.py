"""Tables from runs read back from MLflow (no torch, no ray): what `segtune runs` shows."""

from __future__ import annotations

from dataclasses import dataclass

from tracking.runs import PRUNED, TRIAL_ID, trial_runs


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    lr: float | None
    batch_size: int | None
    epochs: int | None
    val_dice_best: float | None
    val_dice_last: float | None
    test_iou: float | None
    status: str  # FINISHED, pruned, FAILED, RUNNING, KILLED
    gpu_hours: float | None = None  # the trial's cost: GPUs x wall time (0 without GPUs)
    cpu_hours: float | None = None  # CPUs x wall time, for a trial without GPUs


def _num(value: str | None, kind: type) -> float | int | None:
    try:
        return kind(float(value)) if value is not None else None
    except ValueError:
        return None


def sweep_rows(uri: str, experiment: str, sweep_id: str | None = None) -> list[TrialRow]:
    """One row per trial of the sweep (the latest sweep when `sweep_id` is None)."""
    rows = []
    for run in trial_runs(uri, experiment, sweep_id):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        status = "pruned" if t.get(PRUNED) == "true" else run.info.status
        rows.append(TrialRow(
            trial_id=t.get(TRIAL_ID, "?"), run_id=run.info.run_id,
            lr=_num(p.get("train.lr"), float), batch_size=_num(p.get("train.batch_size"), int),
            epochs=_num(p.get("train.epochs"), int), val_dice_best=m.get("val/dice_best"),
            val_dice_last=m.get("val/dice"), test_iou=m.get("test/iou"), status=status,
            gpu_hours=m.get("cost/gpu_hours"), cpu_hours=m.get("cost/cpu_hours"),
        ))
    return rows
