"""Shared pytest fixtures.

``mlflow_server`` is one real MLflow tracking server for the whole test session (starting
one takes several seconds), with its SQLite store and artifacts in a temporary directory.
Tests point clients at ``mlflow_server.uri``; ``mlflow_server.home`` holds its files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tracking.server import LocalServer, ServerInfo, free_port


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
        f"search.storage_path={tmp_path / 'ray'}",
        f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=test-{tmp_path.name}",
    ])
