"""infra/mlflow/mlflow-server.sh: basic auth with a required, non-default admin password.

The PostgreSQL + S3 side of the script is exercised by test_postgres.py; here a SQLite backend
keeps the start short, since only the auth app is under test.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import requests

from tests.cluster.conftest import REPO, free_port

MLFLOW_SH = REPO / "infra" / "mlflow" / "mlflow-server.sh"
SEARCH = "/api/2.0/mlflow/experiments/search"


def script(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(MLFLOW_SH), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("password, why", [
    (None, "needs MLFLOW_AUTH_ADMIN_PASSWORD"),
    ("password1234", "well-known default"),
    ("short", "at least 12 characters"),
])
def test_auth_needs_a_real_admin_password(password, why, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    if password is not None:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    res = script("start", "--home", str(tmp_path), "--auth", "--port", str(free_port()),
                 "--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", str(tmp_path / "a"),
                 env=env)
    assert res.returncode == 2 and why in res.stderr
    assert not (tmp_path / "server.json").exists()


def test_required_stores_are_named(tmp_path) -> None:
    res = script("start", "--home", str(tmp_path), env=dict(os.environ))
    assert res.returncode == 2 and "--backend-store-uri" in res.stderr


def test_basic_auth_server_refuses_anonymous_requests(tmp_path) -> None:
    port, password = free_port(), "s3gtune-test-admin-pw"
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    res = script("start", "--home", str(tmp_path), "--auth", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", str(tmp_path / "a"),
                 env=env, timeout=180)
    try:
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        assert "basic auth on" in res.stdout
        # The ini the server reads holds no secret; the password came from the environment.
        assert password not in (tmp_path / "basic_auth.ini").read_text()
        url = f"http://127.0.0.1:{port}{SEARCH}"
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not take loopback requests
        assert session.get(url, params={"max_results": 1}, timeout=10).status_code == 401
        ok = session.get(url, params={"max_results": 1}, auth=("admin", password), timeout=10)
        assert ok.status_code == 200, ok.text
        assert session.get(url, params={"max_results": 1}, auth=("admin", "wrong"), timeout=10).status_code == 401
    finally:
        script("stop", "--home", str(tmp_path), env=env)
    assert not (tmp_path / "server.json").exists()
