"""`segtune report`: the thesis's results table with ours beside it, read back from MLflow.

Rows come from experiment files' `reference:` blocks (the caller loads the YAML; this module
sees plain `FileSpec`s): files with the same `reference.row` are one row (a 20- and a 50-epoch
file). Each row has four settings, each with our number and the thesis's:

- zero-shot: the latest finished `zero_shot` run of the row's files on the test split
  (`segtune eval FILE --zero-shot`); prompt-search runs are left out;
- fine-tuned at N epochs, one column per `reference.epochs` value: the latest finished
  standalone trial (`segtune train FILE`) of the file whose reference has those epochs;
- best sweep trial: over the row's sweeps, the trial `segtune promote` would pick (best
  `val/dice_best`), shown with its test IoU; the thesis value beside it is the row's best.

A run belongs to a file by its `name` param (every run logs the flattened config), and goes in
a column only when its params match the row's reference (tracking.placement: model, freeze
policy, prompts, the column's epochs, no capped data). A newer run that does not match (a quick
run with `dataset.max_train` or `eval.sample`, `--set train.epochs=2`) is shown apart, below
the table, with the reason. MLflow only (no torch, no ray): the report can run anywhere the
server is reachable. Reading runs and fetching figures take a while on a big study: the long
functions take `track`, a wrapper around their loops that draws progress (the CLI passes
`segtune.progress.track`; tracking cannot import it).
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tracking.errors import TrackingError
from tracking.evals import SEARCH, ZERO_SHOT
from tracking.placement import Verdict, judge
from tracking.registry import select_best
from tracking.runs import KIND, SWEEP_ID, quiet_mlflow, trial_runs


@dataclass(frozen=True)
class FileSpec:
    """What the report needs of one experiment file."""

    name: str
    uri: str
    experiment: str
    row: str
    dataset: str
    setting: str
    model: str
    thesis_iou: float
    epochs: int | None  # None: the thesis's number is zero-shot
    thesis_loss: float | None = None
    note: str | None = None
    # The file's reference settings (tracking.placement.reference_settings); empty: the model key only.
    settings: dict[str, str] = field(default_factory=dict)


@dataclass
class Cell:
    ours: float | None = None
    thesis: float | None = None
    run_id: str | None = None
    uri: str | None = None
    detail: str = ""
    why: str = ""  # a run shown apart: why it is not in the table
    reduced: bool = False  # ... and whether it scored capped data


@dataclass
class Row:
    key: str
    dataset: str
    setting: str
    cells: dict[str, Cell] = field(default_factory=dict)  # column -> cell
    sweep: tuple[str, str, str] | None = None  # (uri, experiment, sweep id) of the best trial
    notes: list[str] = field(default_factory=list)
    apart: dict[str, Cell] = field(default_factory=dict)  # column -> a newer run that does not match


ZS, SWEEP = "zero-shot", "best sweep trial"
T = TypeVar("T")
Track = Callable[[Iterable[Any], str], Iterable[Any]]


def _each(items: Iterable[T], label: str, track: Track | None) -> Iterable[T]:
    """`items`, through the caller's progress wrapper when there is one."""
    return items if track is None else track(list(items), label)


def columns(specs: list[FileSpec]) -> list[str]:
    """zero-shot, one column per fine-tuning length the references name, best sweep trial."""
    return [ZS, *[f"{e} epochs" for e in sorted({s.epochs for s in specs if s.epochs})], SWEEP]


def _runs(uri: str, experiment: str, name: str) -> list[Run]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"params.name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=2000)


def _latest(runs: list[Run], kind: str, spec: FileSpec, epochs: int | None,
            metric: str = "test/iou") -> tuple[Run | None, tuple[Run, Verdict] | None]:
    """The newest finished run of `kind` with `metric` whose settings match the column (runs are
    newest first), and the newest one newer than it that does not match, with the reasons."""
    apart = None
    for r in runs:
        t = r.data.tags
        if (t.get(KIND) == kind and r.info.status == "FINISHED" and metric in r.data.metrics
                and t.get(SEARCH) != "prompt" and t.get(SWEEP_ID, "none") == "none"):
            verdict = judge(r.data.params, settings=spec.settings, model=spec.model, epochs=epochs,
                            zero_shot=kind == ZERO_SHOT)
            if verdict.placed:
                return r, apart
            apart = apart or (r, verdict)
    return None, apart


def _apart(run: Run, verdict: Verdict, spec: FileSpec, metric: str = "test/iou") -> Cell:
    return Cell(run.data.metrics.get(metric), run_id=run.info.run_id, uri=spec.uri,
                detail=f"run {run.info.run_id[:8]} of {spec.name}", why=verdict.why(), reduced=bool(verdict.reduced))


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _zero_shot(row: Row, files: list[FileSpec], runs: dict[str, list[Run]]) -> None:
    """Any file of the row may have been scored zero-shot: the newest matching run, and apart
    the newest one after it that does not match."""
    found = [(_latest(runs[s.name], ZERO_SHOT, s, None), s) for s in files]
    placed = [(r, s) for (r, _), s in found if r is not None]
    since = max((r.info.start_time for r, _ in placed), default=-1)
    apart = [(a, s) for (_, a), s in found if a is not None and a[0].info.start_time > since]
    if placed:
        r, s = max(placed, key=lambda rs: rs[0].info.start_time)
        row.cells[ZS] = Cell(r.data.metrics["test/iou"], run_id=r.info.run_id, uri=s.uri)
        if "test/iou_best_mask" in r.data.metrics:
            row.cells[ZS].detail = f"best single mask {_pct(r.data.metrics['test/iou_best_mask'])}"
    if apart:
        (r, verdict), s = max(apart, key=lambda a: a[0][0].info.start_time)
        row.apart[ZS] = _apart(r, verdict, s)


def collect(specs: list[FileSpec], track: Track | None = None) -> list[Row]:
    """One Row per `reference.row`, in the order the files first name them. `track` wraps the
    loop over rows (one round of MLflow searches each) to show progress."""
    cols = columns(specs)
    rows: dict[str, Row] = {}
    for spec in specs:
        rows.setdefault(spec.row, Row(spec.row, spec.dataset, spec.setting))
    for key, row in _each(rows.items(), "report: reading runs", track):
        files = [s for s in specs if s.row == key]
        runs = {s.name: _runs(s.uri, s.experiment, s.name) for s in files}
        row.cells = {c: Cell() for c in cols}
        _zero_shot(row, files, runs)
        for s in files:
            col = ZS if s.epochs is None else f"{s.epochs} epochs"
            row.cells[col].thesis = s.thesis_iou
            if s.note:
                row.notes.append(s.note)
            if s.epochs is None:
                continue
            r, apart = _latest(runs[s.name], "trial", s, s.epochs)
            if r is not None:
                loss = r.data.metrics.get("train/dice_loss")
                row.cells[col] = Cell(r.data.metrics["test/iou"], s.thesis_iou, r.info.run_id, s.uri,
                                      detail=f"train/dice_loss {loss:.3f}" if loss is not None else "")
            if apart is not None:
                row.apart[col] = _apart(*apart, s)
            if s.thesis_loss is not None:
                row.cells[col].detail += f" (thesis {s.thesis_loss:.3f})"
        row.cells[SWEEP].thesis = max(s.thesis_iou for s in files)
        _best_sweep(row, files, runs)
        row.notes = list(dict.fromkeys(row.notes))
    return list(rows.values())


def _best_sweep(row: Row, files: list[FileSpec], runs: dict[str, list[Run]]) -> None:
    """The row's best trial over all its sweeps, by `val/dice_best` (as `segtune promote`)."""
    trials: list[tuple[Run, FileSpec]] = []
    for s in files:
        for parent in (r for r in runs[s.name] if r.data.tags.get(KIND) == "sweep"):
            for t in trial_runs(s.uri, s.experiment, parent.data.tags[SWEEP_ID]):
                trials.append((t, s))
    # A sweep searched the length: its trials are held to the row's settings and whole data only.
    verdicts = {t.info.run_id: judge(t.data.params, settings=s.settings, model=s.model, epochs=None)
                for t, s in trials}
    best = _best([(t, s) for t, s in trials if verdicts[t.info.run_id].placed])
    other = _best([(t, s) for t, s in trials if not verdicts[t.info.run_id].placed])
    if best is not None:
        t, spec = best
        p = t.data.params
        cell = row.cells[SWEEP]
        cell.ours, cell.run_id, cell.uri = t.data.metrics.get("test/iou"), t.info.run_id, spec.uri
        cell.detail = (f"lr {float(p.get('train.lr', 'nan')):.1e}, batch {p.get('train.batch_size')}, "
                       f"{p.get('train.epochs')} epochs, val/dice_best {t.data.metrics['val/dice_best']:.3f}")
    if other is not None and (best is None or other[0].info.start_time > best[0].info.start_time):
        t, spec = other
        row.apart[SWEEP] = _apart(t, verdicts[t.info.run_id], spec)
    shown = best or other  # the figures show the placed sweep, else the one shown apart
    if shown is not None:
        row.sweep = (shown[1].uri, shown[1].experiment, shown[0].data.tags[SWEEP_ID])


def _best(trials: list[tuple[Run, FileSpec]]) -> tuple[Run, FileSpec] | None:
    """The trial `segtune promote` would pick (best `val/dice_best`) with its file, if any."""
    if not trials:
        return None
    try:
        best = select_best([t for t, _ in trials], "val/dice_best")
    except TrackingError:
        return None
    return next((t, s) for t, s in trials if t.info.run_id == best.info.run_id)


def notes(rows: list[Row], cols: list[str]) -> list[str]:
    """What the table's cells cannot hold: AMG's second protocol, losses, sweep settings, caveats."""
    out: list[str] = []
    for r in rows:
        for c in cols:
            cell = r.cells[c]
            if cell.detail.strip() and (cell.ours is not None or cell.thesis is not None):
                out.append(f"{r.key}, {c}: {cell.detail.strip()}")
        out += [f"{r.key}: {n}" for n in r.notes]
    return out


def markdown(rows: list[Row], cols: list[str]) -> str:
    """The table: per setting, our test IoU and the thesis's; then the notes."""
    head = ["dataset", "model, setting"] + [h for c in cols for h in (c, "thesis")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.dataset, r.setting] + [_pct(v) for c in cols for v in (r.cells[c].ours, r.cells[c].thesis)]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    extra = notes(rows, cols)
    text = "\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {n}" for n in extra) + "\n" if extra else "")
    apart = [[r.dataset, r.setting, c, _pct(cell.ours), cell.detail, cell.why] for r, c, cell in _apart_cells(rows, cols)]
    if apart:
        head = ["dataset", "model, setting", "column", "ours", "run", "why not in the table"]
        text += (f"\n{APART}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
                 + "".join("| " + " | ".join(x.replace("|", "\\|") for x in a) + " |\n" for a in apart))
    return text


APART = "Runs not in the table: newer than the runs in it, but their settings are not the thesis row's."


def _apart_cells(rows: list[Row], cols: list[str]) -> list[tuple[Row, str, Cell]]:
    return [(r, c, r.apart[c]) for r in rows for c in cols if c in r.apart]


def _fetch_overlays(cell: Cell, dest: Path) -> list[Path]:
    if cell.run_id is None or cell.uri is None:
        return []
    client = MlflowClient(cell.uri)
    names = [a.path for a in client.list_artifacts(cell.run_id, "overlays") if a.path.endswith(".png")]
    if not names:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(cell.run_id, "overlays", str(dest.parent / (dest.name + ".dl"))))
    out = []
    for png in sorted(local.glob("*.png")):
        out.append(Path(shutil.copy(png, dest / png.name)))
    shutil.rmtree(dest.parent / (dest.name + ".dl"), ignore_errors=True)
    return out


def _sweep_figures(row: Row, out: Path) -> list[Path]:
    """Loss and validation-Dice curves per trial, and parallel coordinates, of the row's best sweep."""
    from tracking.figures import plot_curves, plot_parallel

    assert row.sweep is not None
    uri, experiment, sweep_id = row.sweep
    client = MlflowClient(uri)
    trials = trial_runs(uri, experiment, sweep_id)
    histories: dict[str, dict[str, list[tuple[int, float]]]] = {}
    table: list[dict[str, float]] = []
    for t in trials:
        tid = t.data.tags.get("segtune.trial_id", t.info.run_id[:8])
        histories[tid] = {k: [(m.step, m.value) for m in client.get_metric_history(t.info.run_id, k)]
                          for k in ("train/dice_loss", "val/dice")}
        values: dict[str, float] = {}
        for k in ("train.lr", "train.batch_size", "train.epochs"):
            try:
                values[k] = float(t.data.params[k])
            except (KeyError, ValueError):
                pass
        if "val/dice_best" in t.data.metrics:
            values["val/dice_best"] = t.data.metrics["val/dice_best"]
        table.append(values)
    title = f"{row.key}: sweep {sweep_id}"
    return [plot_curves(histories, out / f"curves_{row.key}.png", title),
            plot_parallel(table, ["train.lr", "train.batch_size", "train.epochs"], "val/dice_best",
                          out / f"parallel_{row.key}.png", title)]


def write_html(rows: list[Row], cols: list[str], out: Path, track: Track | None = None) -> Path:
    """report.md, index.html and the figures: bars, sweep curves and parallel coordinates, overlays
    (those of runs shown apart too). `track` wraps the loop over rows, which downloads."""
    from tracking.figures import plot_bars

    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, cols)
    (out / "report.md").write_text(md)
    labels = [f"{r.key}" for r in rows]
    series = {c: [r.cells[c].ours for r in rows] for c in cols}
    thesis = {c: [r.cells[c].thesis for r in rows] for c in cols}
    figures = [plot_bars(labels, series, thesis, out / "test_iou_bars.png")]
    sections: list[str] = []
    for r in _each(rows, "report: figures and overlays", track):
        parts: list[str] = []
        if r.sweep is not None:
            figures_row = _sweep_figures(r, out)
            parts += [f'<img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in figures_row]
        for c in cols:
            for cell, suffix in ((r.cells[c], ""), (r.apart.get(c), "_apart")):
                pngs = _fetch_overlays(cell, out / "overlays" / r.key / (c.replace(" ", "_") + suffix)) if cell else []
                if cell and pngs:
                    label = f"{c} — run {cell.run_id}" + (f" (not in the table: {cell.why})" if suffix else "")
                    parts.append(f"<h4>{html.escape(label)}</h4>")
                    parts += [f'<img src="{html.escape(p.relative_to(out).as_posix())}" alt="overlay">' for p in pngs]
        if parts:
            sections.append(f"<h3>{html.escape(r.dataset)}: {html.escape(r.setting)}</h3>\n" + "\n".join(parts))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["dataset", "model, setting"]
                   + [h for c in cols for h in (c, "thesis")])
    body = []
    for r in rows:
        tds = [html.escape(r.dataset), html.escape(r.setting)]
        for c in cols:
            cell = r.cells[c]
            tds += [f'<span title="{html.escape(cell.detail.strip())}">{_pct(cell.ours)}</span>',
                    f'<span class="thesis">{_pct(cell.thesis)}</span>']
        body.append("<tr>" + "".join(f"<td>{x}</td>" for x in tds) + "</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>segtune report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:nth-child(-n+2){{text-align:left}}
.thesis{{color:#666}} img{{max-width:100%;margin:4px 0;display:block}}</style></head><body>
<h1>Test IoU: ours beside the thesis</h1>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table>
<ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes(rows, cols))}</ul>
{_apart_html(rows, cols)}
<h2>Test IoU per model and dataset</h2>
{"".join(f'<img src="{html.escape(p.name)}" alt="bars">' for p in figures)}
<h2>Sweeps and masks</h2>
{chr(10).join(sections) or "<p>No sweeps or overlays yet.</p>"}
</body></html>
"""
    (out / "index.html").write_text(page)
    return out / "index.html"


def _apart_html(rows: list[Row], cols: list[str]) -> str:
    apart = _apart_cells(rows, cols)
    if not apart:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("dataset", "model, setting", "column", "ours", "run", "why not in the table"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in (r.dataset, r.setting, c, _pct(cell.ours),
                                                                          cell.detail, cell.why)) + "</tr>"
                   for r, c, cell in apart)
    return f"<h2>Not in the table</h2>\n<p>{html.escape(APART)}</p>\n<table><tr>{head}</tr>{body}</table>"


def report(specs: list[FileSpec], out: Path | None = None, track: Track | None = None) -> tuple[str, list[Row]]:
    """The Markdown table (and, with `out`, the HTML page and figures) for these files; `track`
    wraps the long loops (reading runs, fetching figures) to show progress."""
    if not specs:
        raise TrackingError("segtune report: no experiment file with a reference: block was given.")
    quiet_mlflow()  # no artifact progress bars between the table's lines
    cols = columns(specs)
    rows = collect(specs, track)
    if out is not None:
        write_html(rows, cols, out, track)
    return markdown(rows, cols), rows


def as_dict(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows as plain data (for tests and `--json`)."""
    return [{"row": r.key, "dataset": r.dataset, "setting": r.setting,
             "cells": {c: {"ours": v.ours, "thesis": v.thesis, "run_id": v.run_id} for c, v in r.cells.items()},
             "apart": {c: {"ours": v.ours, "run_id": v.run_id, "why": v.why, "reduced": v.reduced}
                       for c, v in r.apart.items()}}
            for r in rows]
