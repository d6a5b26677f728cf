"""Tests of tracking.server against a real MLflow server in a temporary directory.

The module shares one server (starting it takes several seconds); the tests run in file
order and the stop test comes last, after which the server is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

import tracking.server as server_mod
from tracking.errors import TrackingError
from tracking.server import (
    LocalServer,
    ServerInfo,
    check_server,
    free_port,
    server_status,
    start_server,
    stop_server,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    with LocalServer(tmp_path_factory.mktemp("server")) as info:
        yield info


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_health_answers_ok(server: ServerInfo) -> None:
    resp = requests.get(f"{server.uri}/health", timeout=5)
    assert resp.status_code == 200 and resp.text.strip() == "OK"
    check_server(server.uri)
    assert (server.home / "server.json").exists()
    assert (server.home / "mlflow.db").exists()


def test_client_logs_and_reads_back(server: ServerInfo, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    exp_id = client.create_experiment("server-test")
    # Artifacts are proxied by the server, not written straight to its directory.
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(exp_id, tags={"segtune.kind": "trial"})
    run_id = run.info.run_id
    client.log_metric(run_id, "val/dice", 0.75, step=1)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    client.log_artifact(run_id, str(note), artifact_path="notes")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.metrics["val/dice"] == pytest.approx(0.75)
    assert got.data.tags["segtune.kind"] == "trial"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    local = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello"
    assert list((server.home / "mlartifacts").rglob("note.txt"))

    client.create_registered_model("segtune-test-model")
    version = client.create_model_version(
        "segtune-test-model", f"runs:/{run_id}/notes", run_id=run_id
    )
    client.set_registered_model_alias("segtune-test-model", "champion", version.version)
    alias = client.get_model_version_by_alias("segtune-test-model", "champion")
    assert alias.version == version.version


def test_status_and_reuse(server: ServerInfo) -> None:
    status = server_status(server.home)
    assert status is not None and status.pid == server.pid and status.uri == server.uri
    again = start_server(server.home)
    assert again.pid == server.pid and again.port == server.port
    assert server.uri in server.ui_hint() and f"ssh -L {server.port}" in server.ui_hint()


def test_free_port() -> None:
    port = free_port(0)
    assert 0 < port < 65536
    assert free_port(port) == port


def test_local_uris_need_no_server(tmp_path: Path) -> None:
    check_server(f"file://{tmp_path}/mlruns")
    check_server(f"sqlite:///{tmp_path}/mlflow.db")


def test_check_server_closed_port_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port(0)}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_server(uri)
    assert time.monotonic() - start < 10
    assert uri in str(err.value)


@pytest.mark.parametrize(
    "script, timeout",
    [
        ("print('boom'); raise SystemExit(3)", 30.0),
        ("import time; print('boom'); time.sleep(60)", 2.0),
    ],
    ids=["exits", "hangs"],
)
def test_failed_start_is_cleaned_up(
    script: str, timeout: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for a server that dies at once or never answers: either way the caller
    # gets the log's tail, and no process or record is left behind.
    monkeypatch.setattr(server_mod, "_server_command", lambda *a: [sys.executable, "-uc", script])
    children = dict(server_mod._CHILDREN)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="boom"):
        start_server(tmp_path, timeout=timeout)
    assert time.monotonic() - start < timeout + 20
    assert not (tmp_path / "server.json").exists()
    assert server_mod._CHILDREN == children  # reaped, not a zombie


def test_stop_server(server: ServerInfo) -> None:
    assert stop_server(server.home) is True
    assert not _pid_running(server.pid)
    assert not (server.home / "server.json").exists()
    assert server_status(server.home) is None
    with pytest.raises(TrackingError, match=str(server.port)):
        check_server(server.uri, timeout=2)
    assert stop_server(server.home) is False


def test_shell_script_parses() -> None:
    script = REPO / "infra" / "local" / "mlflow-server.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
