"""`segtune eval`, `segtune prompt-search` and `segtune report`: the study's commands.

Plain functions with typer annotations, registered in segtune.cli (`_add_study_commands`).
Each imports its module when it runs, so `segtune --help` stays fast and `segtune report`
never imports torch (it reads YAML with pydantic and runs with MLflow only).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

SetOpt = typer.Option(None, "--set", help="Override a field: --set eval.split=val (repeatable).")
UriOpt = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the file's tracking.uri).")
THESIS = Path(__file__).resolve().parents[1] / "experiments" / "thesis"


def say(line: str) -> None:
    typer.echo(line)


def print_config(cfg) -> None:
    """The experiment as it would run, as YAML, secrets in URIs masked; then exit 0."""
    import yaml

    from tracking.redact import redact

    typer.echo(redact(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)), nl=False)
    raise typer.Exit()


def _load(file: Path, overrides: Optional[List[str]], uri: Optional[str], extra: list[str] | None = None):
    from segtune.config import load_config

    sets = list(overrides or []) + list(extra or [])
    if uri:
        sets.append(f"tracking.uri={uri}")
    return load_config(file, sets)


def eval_command(
    file: Path = typer.Argument(..., help="Experiment YAML file: the data, eval prompt and protocol."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Score the file's model as built, untrained."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A segtune checkpoint folder."),
    run: Optional[str] = typer.Option(None, "--run", help="A run id whose checkpoints/best is scored."),
    model: Optional[str] = typer.Option(None, "--model", help="A registered model: models:/NAME@ALIAS."),
    split: Optional[str] = typer.Option(None, "--split", help="train, val or test (default: the file's eval.split)."),
    tracking_uri: Optional[str] = UriOpt,
    set_: Optional[List[str]] = SetOpt,
    show_config: bool = typer.Option(False, "--print-config", help="Print the resolved experiment (after "
                                     "--set) as YAML and exit; nothing is scored."),
) -> None:
    """Score a model zero-shot (SAM AMG, point/box prompts, CLIPSeg text) or any trained checkpoint."""
    from segtune.errors import ConfigError
    from segtune.evaluate import evaluate_checkpoint
    from segtune.evaluate import zero_shot as run_zero_shot

    cfg = _load(file, set_, tracking_uri, [f"eval.split={split}"] if split else None)
    if show_config:
        print_config(cfg)
    sources = sum(x is not None for x in (checkpoint, run, model)) + int(zero_shot)
    if sources != 1:
        raise ConfigError("segtune eval: give exactly one of --zero-shot, --checkpoint PATH, --run RUN_ID, "
                          "--model models:/NAME@ALIAS.")
    if zero_shot:
        run_zero_shot(cfg, log=say)
    else:
        evaluate_checkpoint(cfg, checkpoint=checkpoint, run_id=run, model_uri=model, log=say)


def prompt_search_command(
    file: Path = typer.Argument(..., help="Experiment YAML file with a prompt_search: section (CLIPSeg)."),
    write: Optional[List[Path]] = typer.Option(None, "--write", help="Also set prompt.text in this experiment "
                                               "file to the best prompt (repeatable; comments are kept)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray)."),
    tracking_uri: Optional[str] = UriOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Score candidate text prompts zero-shot on a training sample (an Optuna study on Ray Tune); keep the best."""
    from segtune.prompt_search import prompt_search

    prompt_search(_load(file, set_, tracking_uri), address=address, write=list(write or []), log=say)


def experiment_files(paths: list[Path]) -> list[Path]:
    """Files as given, folders as their *.yaml (not recursive), in order, without repeats."""
    out: list[Path] = []
    for p in paths:
        found = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        out += [f for f in found if f not in out]
    return out


def file_specs(paths: list[Path], uri: str | None = None) -> list:
    """The report's view of each experiment file with a `reference:` block."""
    from segtune.config import flatten, load_config
    from tracking.placement import reference_settings
    from tracking.study_report import FileSpec

    specs = []
    for f in experiment_files(paths):
        cfg = load_config(f, [f"tracking.uri={uri}"] if uri else None)
        ref = cfg.reference
        if ref is None:
            continue
        specs.append(FileSpec(name=cfg.name, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment, row=ref.row,
                              dataset=ref.dataset, setting=ref.setting, model=cfg.model.key, thesis_iou=ref.test_iou,
                              epochs=ref.epochs, thesis_loss=ref.train_dice_loss, note=ref.note,
                              settings=reference_settings(flatten(cfg))))
    return specs


def report_command(
    experiments: Optional[List[Path]] = typer.Option(None, "--experiments", help="Experiment files or folders "
                                                     "(repeatable; default experiments/thesis)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for index.html, report.md and the figures."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: each "
                                               "file's tracking.uri)."),
) -> None:
    """The thesis's results table with ours beside it (Markdown); with --out, HTML, plots and overlays."""
    from tracking.server import check_server
    from tracking.study_report import report

    if not experiments and not THESIS.is_dir():
        from segtune.errors import ConfigError

        raise ConfigError(f"--experiments: none given, and the thesis files are not at {THESIS} (an installed "
                          "segtune ships without experiments/); pass the experiment files or folders "
                          "to report, e.g. --experiments path/to/segtune/experiments/thesis")
    specs = file_specs(list(experiments or [THESIS]), tracking_uri)
    for uri in dict.fromkeys(s.uri for s in specs):
        check_server(uri)
    from segtune.progress import track

    md, _ = report(specs, out, track=track)
    typer.echo(md, nl=False)
    if out is not None:
        say(f"\nwrote {out / 'index.html'} (and report.md, figures, overlays)")
