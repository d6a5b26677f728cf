"""Fixtures of the study tests: the thesis's tiny twins run once against the session's MLflow
server, one real sweep of one twin, and one local Ray shared by that sweep and the prompt search.

Every twin writes its synthetic data and stores under one package temp folder, and logs into
one MLflow experiment, so the report test reads back exactly what these runs produced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THESIS = REPO / "experiments" / "thesis"
TWINS = sorted((THESIS / "tiny").glob("*_tiny.yaml"))
# Fine-tuned rows scored zero-shot too (the report's zero-shot column beside a fine-tuned row);
# one suffices, each costs CPU time.
ZERO_SHOT_TOO = {"em_sam_e20_tiny"}
EXPERIMENT = "thesis_tiny"  # the twins' own tracking.experiment, so `segtune report` needs no override


def twin_config(path: Path, root: Path, uri: str, extra: list[str] | None = None):
    """A twin file with its data, caches and Ray results under `root`, logging to `uri`."""
    from segtune.config import load_config

    name = load_config(path).dataset.name
    return load_config(path, ["search.finalists=0", f"dataset.root={root / 'data' / name}", f"dataset.cache_dir={root / 'cache'}",
                              f"search.storage_path={root / 'ray'}", f"tracking.uri={uri}", *(extra or [])])


@pytest.fixture(scope="package")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("study")


@pytest.fixture(scope="package")
def ray_local() -> Iterator[None]:
    """One local Ray for the package: segtune's sweeps reuse an initialised Ray (cluster.connect)."""
    import ray

    from segtune.cluster import connect

    started = connect(None)
    yield
    if started:
        ray.shutdown()


@dataclass
class TwinRuns:
    """What running every twin produced: per file name, its zero-shot result and trial metrics."""

    uri: str
    experiment: str
    root: Path
    zero_shot: dict[str, object] = field(default_factory=dict)  # name -> EvalResult
    trained: dict[str, dict] = field(default_factory=dict)  # name -> run_trial metrics
    workdirs: dict[str, Path] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)  # name -> the lines its commands said


@pytest.fixture(scope="package")
def twin_runs(study_root: Path, mlflow_server) -> TwinRuns:
    """Each `*_tiny.yaml` once, through the functions the CLI calls: `segtune eval --zero-shot`
    where the thesis's number is zero-shot (and for ZERO_SHOT_TOO, the untrained baseline of a
    fine-tuned row), `segtune train` where the thesis fine-tuned."""
    from segtune.commands import train_one
    from segtune.evaluate import zero_shot
    from segtune.progress import EVERY_ENV

    out = TwinRuns(mlflow_server.uri, EXPERIMENT, study_root)
    every = os.environ.get(EVERY_ENV)
    os.environ[EVERY_ENV] = "0"  # every progress line, so tests can see the counts
    try:
        for path in TWINS:
            cfg = twin_config(path, study_root, mlflow_server.uri)
            assert cfg.reference is not None
            log = out.logs.setdefault(cfg.name, []).append
            if cfg.reference.epochs is None or cfg.name in ZERO_SHOT_TOO:
                out.zero_shot[cfg.name] = zero_shot(cfg, log=log)
            if cfg.reference.epochs is not None:
                out.workdirs[cfg.name] = study_root / "train" / cfg.name
                out.trained[cfg.name] = train_one(cfg, out.workdirs[cfg.name], log=log)
    finally:
        if every is None:
            os.environ.pop(EVERY_ENV)
        else:
            os.environ[EVERY_ENV] = every
    return out


@pytest.fixture(scope="package")
def twin_sweep(twin_runs: TwinRuns, ray_local, mlflow_server):
    """One real sweep (Ray Tune + Optuna + ASHA) of one twin, into the twins' experiment."""
    from segtune.commands import run_sweep

    cfg = twin_config(THESIS / "tiny" / "em_sam_e20_tiny.yaml", twin_runs.root, mlflow_server.uri)
    return cfg, run_sweep(cfg, log=lambda _: None)
