"""Shared pytest fixtures.

``mlflow_server`` is one real MLflow tracking server for the whole test session (starting
one takes several seconds), with its SQLite store and artifacts in a temporary directory.
Tests point clients at ``mlflow_server.uri``; ``mlflow_server.home`` holds its files.

``scratch_tmpdir`` (automatic) gives the session one temporary folder for everything that is
not under a test's ``tmp_path``: Ray's session logs, MLflow's downloads, the ranks' working
copies, and that of every process the tests start. It is removed when the session ends, so a
run leaves nothing behind in /tmp but pytest's own folders of failed tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracking.server import LocalServer, ServerInfo, free_port


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TMPDIR (and Ray's RAY_TMPDIR) for this process and its children, removed at the end."""
    tmp_path_factory.getbasetemp()  # pytest's own folder stays where pytest keeps it
    scratch = Path(tempfile.mkdtemp(prefix="segtune-tests-"))
    scratch.chmod(0o711)  # PostgreSQL runs as its own user and must reach its folder in here
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "RAY_TMPDIR")}
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = str(scratch)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    try:
        yield scratch
    finally:  # after every other session fixture: the servers are stopped by then
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    """A tracking server for the session, stopped (by the pid it started) at the end."""
    # An OS-chosen port: 5000 may belong to a user's own server (or a parallel test session).
    with LocalServer(tmp_path_factory.mktemp("mlflow-server"), port=free_port(0)) as info:
        yield info


REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"


@pytest.fixture(scope="session")
def em_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the synthetic EM stacks, shared by the session (generated on first use)."""
    return tmp_path_factory.mktemp("synthetic_em")


@pytest.fixture
def tiny_config(tmp_path: Path, em_data: Path, mlflow_server: ServerInfo):
    """The demo experiment, shrunk: few patches, short trials, everything under tmp_path."""
    from segtune.config import load_config

    return load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=8", "dataset.max_eval=4",
        "train.epochs=2", "train.batch_size=4",
        "search.finalists=0",  # the robustness matrix of a sweep's best trials: tests/test_sweep.py
        f"search.storage_path={tmp_path / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=test-{tmp_path.name}",
    ])
