"""`segtune report` on a server populated by the twins and one sweep: every row, numbers that
match the runs, the thesis beside each, HTML with plots and overlays, and no torch import.

The twins run on capped data (`dataset.max_train`, `eval.sample`) for a fraction of the
thesis's epochs, so none of their runs belongs in a thesis column: each is shown apart, below
the table, with why (tests/tracking/test_report_placement.py covers runs that are placed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.config import load_config
from tests.study.conftest import THESIS, TWINS
from tracking.registry import select_best
from tracking.runs import trial_runs
from tracking.study_report import APART

TINY = THESIS / "tiny"


@pytest.fixture(scope="module")
def reported(twin_runs, twin_sweep, tmp_path_factory):
    """Run `segtune report` in a fresh interpreter (the CLI's own code path), which also
    reports whether torch got imported and the rows as JSON."""
    out = tmp_path_factory.mktemp("report")
    code = (
        "import json, sys\n"
        "from segtune.cli import app\n"
        f"app(['report', '--experiments', {str(TINY)!r}, '--tracking-uri', {twin_runs.uri!r}, "
        f"'--out', {str(out)!r}], standalone_mode=False)\n"
        "from segtune.study_cli import file_specs\n"
        "from tracking.study_report import as_dict, collect\n"
        f"rows = as_dict(collect(file_specs([__import__('pathlib').Path({str(TINY)!r})], {twin_runs.uri!r})))\n"
        "print('@@ROWS@@' + json.dumps(rows))\n"
        "print('@@TORCH@@', 'torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    table, _, rest = res.stdout.partition("@@ROWS@@")
    rows_json, _, torch_line = rest.partition("@@TORCH@@")
    return table, json.loads(rows_json), torch_line.strip(), out


def test_report_reads_mlflow_without_importing_torch(reported) -> None:
    assert reported[2] == "False"


def test_table_has_every_row_with_the_thesis_number_beside_ours(reported) -> None:
    table, rows, _, _ = reported
    lines = [line for line in table.partition(APART)[0].splitlines() if line.startswith("| ")]
    assert lines[0].split(" | ")[2:] == ["zero-shot", "thesis", "20 epochs", "thesis", "50 epochs", "thesis",
                                         "best sweep trial", "thesis |"]
    refs = {load_config(p).reference.row: [] for p in TWINS}
    for p in TWINS:
        ref = load_config(p).reference
        refs[ref.row].append(ref)
    assert len(lines) == 1 + len(refs) and len(rows) == len(refs)
    for row in rows:
        ref = refs[row["row"]][0]
        line = next(line for line in lines if f"| {ref.dataset} | {ref.setting} |" in line)
        for r in refs[row["row"]]:  # each thesis number in its column, in percent as DESIGN.md
            col = "zero-shot" if r.epochs is None else f"{r.epochs} epochs"
            assert row["cells"][col]["thesis"] == pytest.approx(r.test_iou)
            assert f"{100 * r.test_iou:.1f}%" in line


def test_numbers_match_the_runs_shown_apart_as_reduced(reported, twin_runs, twin_sweep) -> None:
    table, rows, _, _ = reported
    cells = {r["row"]: r["cells"] for r in rows}
    apart = {r["row"]: r["apart"] for r in rows}
    for name, result in twin_runs.zero_shot.items():
        row = load_config(TINY / f"{name}.yaml").reference.row
        assert apart[row]["zero-shot"]["ours"] == pytest.approx(result.metrics["test/iou"]), name
        assert apart[row]["zero-shot"]["reduced"] and "eval.sample=" in apart[row]["zero-shot"]["why"], name
        assert cells[row]["zero-shot"]["ours"] is None, name
    for name, metrics in twin_runs.trained.items():
        ref = load_config(TINY / f"{name}.yaml").reference
        col = f"{ref.epochs} epochs"
        assert apart[ref.row][col]["ours"] == pytest.approx(metrics["test/iou"]), name
        assert "dataset.max_train=4" in apart[ref.row][col]["why"], name
        assert f"(reference {ref.epochs})" in apart[ref.row][col]["why"], name  # the twins train 1 or 2 epochs
        assert cells[ref.row][col]["ours"] is None and cells[ref.row][col]["thesis"] == pytest.approx(ref.test_iou)
    cfg, outcome = twin_sweep
    best = select_best(trial_runs(cfg.tracking.uri, cfg.tracking.experiment, outcome.sweep_id), "val/dice_best")
    sweep_cell = apart["em_sam"]["best sweep trial"]
    assert sweep_cell["run_id"] == best.info.run_id
    assert sweep_cell["ours"] == pytest.approx(best.data.metrics["test/iou"])
    assert cells["em_sam"]["best sweep trial"]["thesis"] == pytest.approx(0.271)  # the row's best thesis number
    assert "best sweep trial" not in apart["em_clipseg"]  # no sweep of that row ran
    below = table.partition(APART)[2]
    assert best.info.run_id[:8] in below and "reduced: dataset.max_train=4" in below


def test_html_plots_and_overlays_are_written(reported, twin_sweep) -> None:
    _, _, _, out = reported
    page = (out / "index.html").read_text()
    assert "<table>" in page and "92.3%" in page and (out / "report.md").read_text().startswith("| dataset")
    for png in ("test_iou_bars.png", "curves_em_sam.png", "parallel_em_sam.png"):
        assert (out / png).is_file() and png in page
        with Image.open(out / png) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    overlays = sorted((out / "overlays").rglob("*.png"))
    # Two per scored run, shown apart: 4 zero-shot rows + em_sam's baseline, 10 fine-tuned, 1 best sweep trial.
    assert len(overlays) == 2 * (5 + 10 + 1)
    for png in overlays:
        with Image.open(png) as img:
            assert img.size == (768, 256)
        assert png.relative_to(out).as_posix() in page


def test_the_sweep_trials_are_in_the_twins_experiment(twin_sweep) -> None:
    cfg, outcome = twin_sweep
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              filter_string=f"tags.`segtune.sweep_id` = '{outcome.sweep_id}'")
    assert sorted(r.data.tags["segtune.kind"] for r in runs) == ["sweep", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
