"""Shared pytest fixtures.

``mlflow_server`` is one real MLflow tracking server for the whole test session (starting
one takes several seconds), with its SQLite store and artifacts in a temporary directory.
Tests point clients at ``mlflow_server.uri``; ``mlflow_server.home`` holds its files.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tracking.server import LocalServer, ServerInfo


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    """A tracking server for the session, stopped (by the pid it started) at the end."""
    with LocalServer(tmp_path_factory.mktemp("mlflow-server")) as info:
        yield info
