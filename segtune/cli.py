"""The `segtune` command line. Subcommands import their modules lazily, so `--help` is fast.

User errors (bad config, data, checkpoints, unreachable servers) print one paragraph and exit 1;
tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from segtune.study_cli import UriOpt, print_config  # typer only: --help stays fast

app = typer.Typer(help="Fine-tune promptable segmentation models with Ray Tune sweeps tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
server_app = typer.Typer(help="The local MLflow tracking server (SQLite + local artifacts, on 127.0.0.1).",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")


def _add_data_commands() -> None:
    from segtune.data_cli import data_app  # typer only; the commands import their modules lazily

    app.add_typer(data_app, name="data", help="Datasets: synthesise, check, prepare, inspect stores.")


_add_data_commands()

# Inside the package, so an installed segtune has them (experiments/demo*.yaml link here).
PRESETS = Path(__file__).resolve().with_name("presets")
DEMO_FILES = [PRESETS / "demo.yaml", PRESETS / "demo_clipseg.yaml"]
SetOpt = typer.Option(None, "--set", help="Override a field: --set train.lr=3e-4 (repeatable).")
# The commands that read runs back take the server from --tracking-uri, $MLFLOW_TRACKING_URI or
# the local default, as MLflow's own tools do.
ServerUriOpt = typer.Option("http://127.0.0.1:5000", "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                            help="MLflow tracking URI (or $MLFLOW_TRACKING_URI).")
HomeOpt = typer.Option(Path(".segtune/mlflow"), "--home", help="Folder of the local server's database and artifacts.")


#: `segtune sweep`'s exit status when no trial ended with a result (every one failed, or was
#: stopped before its first epoch); user errors exit 1 and Ctrl-C 130, as every command does.
NO_RESULT = 2
PrintConfigOpt = typer.Option(False, "--print-config", help="Print the resolved experiment (after --set) "
                              "as YAML and exit; nothing is launched.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"segtune {version('segtune')}")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                            help="Print segtune's version and exit.")) -> None:
    """Fine-tune promptable segmentation models with Ray Tune sweeps tracked in MLflow."""


def say(line: str) -> None:
    """Print a line with URI passwords and secret environment values masked."""
    from tracking.redact import redact

    typer.echo(redact(line))


def _load(file: Path, overrides: Optional[List[str]], uri: Optional[str]):
    from segtune.config import load_config

    sets = list(overrides or [])
    if uri:
        sets.append(f"tracking.uri={uri}")
    return load_config(file, sets)


@app.command()
def sweep(file: Path = typer.Argument(..., help="Experiment YAML file; with --resume, also a sweep folder."),
          tracking_uri: Optional[str] = UriOpt,
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray://host:10001 or auto); "
                                                "default RAY_ADDRESS, else a local Ray."),
          resume: bool = typer.Option(False, "--resume", help="Continue the latest unfinished sweep of FILE, or the "
                                      "sweep whose folder (under search.storage_path) FILE is."),
          warm_start: Optional[str] = typer.Option(None, "--warm-start", metavar="EXPERIMENT|auto", help=(
              "Give the searcher the finished trials of the same model, dataset, freeze policy and prompt "
              "in this MLflow experiment (`auto`: the file's tracking.experiment) before its first "
              "suggestion; configurations that finished there are not run again.")),
          set_: Optional[List[str]] = SetOpt,
          show_config: bool = PrintConfigOpt) -> None:
    """Run a hyperparameter sweep (Ray Tune + Optuna TPE + ASHA), each trial an MLflow child run.

    Exits 0 when at least one trial ended with a result, 2 when none did (every trial failed or
    was stopped without one), 1 for user errors and 130 on Ctrl-C.
    """
    from segtune.commands import load_resume_dir, run_sweep
    from segtune.console import print_runs

    target: bool | str = resume
    if resume and file.is_dir():
        cfg, target = load_resume_dir(file, list(set_ or []) + ([f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    else:
        cfg = _load(file, set_, tracking_uri)
    if show_config:
        print_config(cfg)
    outcome = run_sweep(cfg, address=address, resume=target, warm_start=warm_start, log=say)
    print_runs(cfg.tracking.uri, cfg.tracking.experiment, outcome.sweep_id)
    from tracking.urls import experiment_runs_url

    if page := experiment_runs_url(cfg.tracking.uri, cfg.tracking.experiment):
        say(f"runs: {page}")
    if outcome.interrupted:
        raise typer.Exit(130)
    if outcome.finished == 0:
        say(f"sweep {outcome.sweep_id}: no trial ended with a result ({outcome.failed} of "
            f"{len(outcome.statuses or {})} failed; each trial's line above names its error.txt, and "
            f"its MLflow run carries the reason in the segtune.error tag). Exit status {NO_RESULT}.")
        raise typer.Exit(NO_RESULT)
    say(f"Promote the best trial: segtune promote {cfg.tracking.experiment} --tracking-uri {cfg.tracking.uri}")


@app.command()
def sync(tracking_uri: str = ServerUriOpt,
         spool: Path = typer.Option(Path(".segtune/spool"), "--spool", help="The spool folder (tracking.spool_dir).")) -> None:
    """Send what trials kept on disk while the tracking server was unreachable."""
    from tracking.server import check_server
    from tracking.spool import deliver_all

    check_server(tracking_uri)
    report = deliver_all(tracking_uri, spool)
    if not report:
        say(f"nothing to send in {spool}")
    for run_id, result in report.items():
        say(f"{run_id}: " + (f"{result} entries sent" if isinstance(result, int) else f"not sent ({result})"))
    if any(isinstance(r, str) for r in report.values()):
        raise typer.Exit(1)


@app.command()
def train(file: Path = typer.Argument(..., help="Experiment YAML file."),
          tracking_uri: Optional[str] = UriOpt,
          out: Path = typer.Option(Path(".segtune/train"), "--out", help="Folder for checkpoints."),
          no_track: bool = typer.Option(False, "--no-track", help="Do not log to MLflow."),
          set_: Optional[List[str]] = SetOpt,
          show_config: bool = PrintConfigOpt) -> None:
    """Train one trial with the file's values (no Ray): the same loop a sweep's trials run."""
    from segtune.commands import train_one

    cfg = _load(file, set_, tracking_uri)
    if show_config:
        print_config(cfg)
    metrics = train_one(cfg, out.resolve(), track=not no_track, log=say)
    say(f"test/iou {metrics.get('test/iou', float('nan')):.4f}; checkpoints in {out / 'checkpoints'}")


@app.command()
def promote(experiment: str = typer.Argument(..., help="MLflow experiment name (the file's tracking.experiment)."),
            tracking_uri: str = ServerUriOpt,
            metric: Optional[str] = typer.Option(None, "--metric", help="Validation metric to select on "
                                                 "(default val/dice_best; val/dice_lcb for a sweep with repeats)."),
            mode: str = typer.Option("max", "--mode", help="max or min."),
            alias: str = typer.Option("challenger", "--alias", help="Alias the new version takes."),
            sweep_id: Optional[str] = typer.Option(None, "--sweep", help="Sweep id (default: the latest sweep)."),
            run_id: Optional[str] = typer.Option(None, "--run", help="Promote this run instead of the best."),
            name: Optional[str] = typer.Option(None, "--name", help="Registered model name "
                                               "(default segtune-<model>-<dataset>)."),
            approve: bool = typer.Option(False, "--approve", help="Also make it champion if its gates pass."),
            reason: Optional[str] = typer.Option(None, "--reason", help="Why, recorded with --approve."),
            force: bool = typer.Option(False, "--force", help="With --approve: champion even over failed gates "
                                       "(recorded)."),
            tolerance: float = typer.Option(0.01, "--tolerance", help="How far the re-scored val Dice may lie "
                                            "from the trial's val/dice_best."),
            min_margin: float = typer.Option(0.0, "--min-margin", help="How much it must beat the champion by."),
            min_prompt_iou: Optional[str] = typer.Option(None, "--min-prompt-iou", help="Floors on its validation "
                                                         "IoU per prompt kind, e.g. box=0.6,random_point=0.4 "
                                                         "(see segtune robustness); below one, the gate fails."),
            ensemble: bool = typer.Option(False, "--ensemble", help="A trial with repeats: register all its members "
                                          "as one model averaging their logits (default: its best member).")) -> None:
    """Register the best finished trial as a self-contained model version (alias challenger) and
    judge its gates; --approve also makes it champion."""
    from segtune.commands import promote_best
    from segtune.prompt_matrix import parse_floors

    floors = parse_floors(min_prompt_iou)  # a malformed value fails before any request
    promote_best(tracking_uri, experiment, metric=metric, mode=mode, alias=alias, sweep_id=sweep_id,
                 run_id=run_id, name=name, approve=approve, reason=reason, force=force, tolerance=tolerance,
                 min_margin=min_margin, min_prompt_iou=floors, ensemble=ensemble, log=say)


@app.command()
def robustness(source: str = typer.Argument(..., help="A run id (its checkpoints/best), or a registered model: "
                                            "models:/NAME@ALIAS, NAME@ALIAS, NAME/VERSION."),
               tracking_uri: str = ServerUriOpt,
               split: str = typer.Option("val", "--split", help="The split to score (val; test only for reports: "
                                         "promotion gates read val)."),
               sample: Optional[int] = typer.Option(None, "--sample", min=1, help="Score at most this many "
                                                    "samples (default: the run's dataset.max_eval).")) -> None:
    """Score a checkpoint under every prompt kind its model takes and with 1, 3 and 5 corrective
    clicks; log robust/<prompt>/iou, a CSV and a heatmap on its run."""
    from segtune.robustness import robustness as run_robustness

    run_robustness(tracking_uri, source, split=split, sample=sample, log=say)


@app.command()
def approve(name: str = typer.Argument(..., help="Registered model name, e.g. segtune-sam_tiny-synthetic_em."),
            version: str = typer.Option(..., "--version", help="The version to make champion."),
            reason: str = typer.Option(..., "--reason", help="Why; recorded on the version."),
            force: bool = typer.Option(False, "--force", help="Approve over failed gates (recorded)."),
            tracking_uri: str = ServerUriOpt) -> None:
    """Move alias champion to a version whose gates passed, recording who, when and why."""
    from segtune.promotion import approve as approve_version

    approve_version(tracking_uri, name, version, reason=reason, force=force, log=say)


@app.command()
def serve(model: str = typer.Argument(..., help="NAME[@ALIAS] (default alias champion) or NAME/VERSION."),
          port: Optional[int] = typer.Option(None, "--port", help="Port on 127.0.0.1 (default 5001, else a free one)."),
          tracking_uri: str = ServerUriOpt) -> None:
    """Serve a registered model on 127.0.0.1 (mlflow models serve), ready once a smoke request passes."""
    import signal

    from tracking.model_server import start
    from tracking.server import check_server, free_port

    check_server(tracking_uri)
    port = port or free_port(5001)
    served = start(tracking_uri, model, port=port, log_dir=Path(".segtune") / "serve", log=say)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on a plain kill too
    try:
        say(f"ready: {served.model_uri} at {served.url}/invocations (pid {served.process.pid}, log {served.log}); "
            "Ctrl-C stops it")
        served.process.wait()
        raise typer.Exit(served.process.returncode or 0)
    finally:
        served.stop()


@app.command()
def runs(experiment: str = typer.Argument(..., help="MLflow experiment name."),
         tracking_uri: str = ServerUriOpt,
         sweep_id: Optional[str] = typer.Option(None, "--sweep", help="Sweep id (default: the latest sweep)."),
         as_json: bool = typer.Option(False, "--json", help="Print the trials as JSON (for scripts) instead of "
                                      "a table.")) -> None:
    """A table of a sweep's trials, read back from MLflow."""
    from tracking.server import check_server

    check_server(tracking_uri)
    if as_json:
        import json
        from dataclasses import asdict

        from tracking.report import sweep_rows

        rows = [asdict(row) for row in sweep_rows(tracking_uri, experiment, sweep_id)]
        typer.echo(json.dumps({"experiment": experiment, "sweep_id": sweep_id, "trials": rows}, indent=1))
        return
    from segtune.console import print_runs

    print_runs(tracking_uri, experiment, sweep_id)


@app.command()
def demo(tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                                    help="Use this MLflow server instead of starting a local one."),
         quick: bool = typer.Option(False, "--quick", help="3 short trials per pair on fewer patches (about a minute)."),
         repeats: bool = typer.Option(False, "--repeats", help="3 seeds per configuration (a third as many "
                                      "configurations), champion by val/dice_lcb."),
         home: Path = HomeOpt,
         set_: Optional[List[str]] = SetOpt) -> None:
    """Synthetic EM data -> local MLflow server -> sweeps of a tiny SAM and a tiny CLIPSeg -> champions."""
    from segtune.demo import run_demo

    run_demo(DEMO_FILES, tracking_uri=tracking_uri, quick=quick, home=home, overrides=set_ or [], repeats=repeats,
             log=say)


@server_app.command("start")
def server_start(home: Path = HomeOpt,
                 port: Optional[int] = typer.Option(None, "--port", help="Port (default 5000, else a free one).")) -> None:
    """Start the local MLflow server (or report the one already running for HOME)."""
    from tracking.server import start_server

    info = start_server(home.resolve(), port=port)
    say(f"MLflow server pid {info.pid} at {info.uri} (data in {info.home}, log {info.log})")
    say(info.ui_hint())


@server_app.command("stop")
def server_stop(home: Path = HomeOpt) -> None:
    """Stop the local MLflow server recorded in HOME (by its pid)."""
    from tracking.server import stop_server

    say("stopped" if stop_server(home.resolve()) else f"no server running for {home}")


@server_app.command("status")
def server_status(home: Path = HomeOpt) -> None:
    """Say whether the local MLflow server for HOME runs, and where."""
    from tracking.server import server_status as status

    info = status(home.resolve())
    if info is None:
        say(f"no server running for {home}")
        raise typer.Exit(1)
    say(f"running: pid {info.pid} at {info.uri} (data in {info.home})")


def main() -> None:
    """Console entry point: user errors as one paragraph, exit code 1, no traceback."""
    import os

    from segtune.errors import SegtuneError
    from tracking.errors import TrackingError

    # MLflow prints each run's URL as it ends, the tracking URI's password included.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        app()
    except (SegtuneError, TrackingError) as err:
        from tracking.redact import redact

        typer.secho(f"error: {redact(str(err))}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        sys.exit(130)
    except Exception as err:
        from mlflow.exceptions import MlflowException  # only now: importing mlflow costs a second

        if not isinstance(err, MlflowException):
            raise
        from tracking.redact import redact

        typer.secho(f"error: the tracking server refused a request: {redact(err.message)}", fg=typer.colors.RED,
                    err=True)
        sys.exit(1)


def _add_study_commands() -> None:
    from segtune import study_cli  # typer only; the commands import their modules lazily

    app.command("eval")(study_cli.eval_command)
    app.command("prompt-search")(study_cli.prompt_search_command)
    app.command("report")(study_cli.report_command)


_add_study_commands()


@app.command()
def cache(file: Path = typer.Argument(..., help="Experiment YAML file: the model and data whose embeddings to cache."),
          device: Optional[str] = typer.Option(None, "--device", help="Where to encode: cuda, cuda:1, cpu "
                                               "(default: the GPU when there is one)."),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field: --set model.train=mask_decoder.")) -> None:
    """Compute the frozen-encoder embedding cache once, before a sweep (no-op when already built)."""
    import torch

    from segtune.cache import for_trial
    from segtune.config import load_config
    from segtune.errors import ConfigError
    from segtune.models import build_model
    from segtune.prepare import prepare_data

    cfg = load_config(file, list(set_ or []))
    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    store, _ = prepare_data(cfg, log=say)
    embeddings = for_trial(cfg, build_model(cfg.model).to(where), store, log=say)
    if embeddings is None:
        raise typer.Exit(1)
    say(f"{embeddings.path} ({'built' if embeddings.built else 'already built'})")

if __name__ == "__main__":
    main()
