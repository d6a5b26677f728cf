"""Console tables of runs read back from MLflow (rich tables over tracking's plain rows)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _cost(gpu_hours: float | None, cpu_hours: float | None) -> str:
    """A trial's cost: GPU-hours, or CPU-hours for a trial without GPUs."""
    if gpu_hours:
        return f"{gpu_hours:.3g} GPU-h"
    return "—" if cpu_hours is None else f"{cpu_hours:.3g} CPU-h"


def print_runs(uri: str, experiment: str, sweep_id: str | None = None, champion_run: str | None = None,
               console: Console | None = None) -> None:
    """Print the sweep's trials: parameters, validation and test scores, cost, status."""
    from tracking.redact import redact
    from tracking.report import sweep_rows

    rows = sweep_rows(uri, experiment, sweep_id)
    # Piped output defaults to 80 columns, which wraps this table; 124 fits it.
    console = console or Console(width=max(Console().width, 124))
    if not rows:
        console.print(f"no sweep trials in experiment {experiment!r} at {redact(uri)}")
        return
    table = Table(title=f"{experiment}: {len(rows)} trials", title_justify="left")
    for col in ("trial", "lr", "batch", "epochs", "val/dice_best", "test/iou", "cost", "status"):
        table.add_column(col, justify="right" if col not in ("trial", "status") else "left")
    for r in rows:
        star = " ★ champion" if r.run_id == champion_run else ""
        val = _fmt(r.val_dice_best) if r.val_dice_best is not None else f"({_fmt(r.val_dice_last)} last)"
        table.add_row(r.trial_id, _fmt(r.lr, ".2e"), str(r.batch_size), str(r.epochs), val,
                      _fmt(r.test_iou), _cost(r.gpu_hours, r.cpu_hours), r.status + star)
    console.print(table)


def print_pairs(results: list, console: Console | None = None) -> None:
    """Compare the demo's model/dataset pairs: best validation, champion test IoU, untrained baseline."""
    console = console or Console(width=max(Console().width, 150))
    table = Table(title="model / dataset pairs", title_justify="left")
    for col in ("pair", "trials", "val/dice_best", "test/iou", "untrained test/iou", "champion"):
        table.add_column(col, justify="left" if col in ("pair", "champion") else "right")
    for r in results:
        table.add_row(r.key, str(r.trials), _fmt(r.val_dice_best), _fmt(r.test_iou), _fmt(r.untrained_test_iou),
                      f"{r.champion.name} v{r.champion.version}")
    console.print(table)
