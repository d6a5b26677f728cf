"""Security: the local server's host check, and no secret in any logged param or tag."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient

from tests.conftest import DEMO
from tracking.redact import redact


def test_local_server_refuses_a_foreign_host_header(mlflow_server) -> None:
    url = f"{mlflow_server.uri}/api/2.0/mlflow/experiments/search"
    ok = requests.post(url, json={"max_results": 1}, timeout=10)
    assert ok.status_code == 200
    foreign = requests.post(url, json={"max_results": 1}, headers={"Host": "evil.example.com"}, timeout=10)
    assert foreign.status_code == 403


def test_redact_masks_uri_passwords_and_secret_values() -> None:
    text = "postgresql://mlflow:pa55word@db:5432/mlflow and key AKIAEXAMPLESECRET and http://host/ok"
    out = redact(text, ["AKIAEXAMPLESECRET"])
    assert "pa55word" not in out and "AKIAEXAMPLESECRET" not in out
    assert "postgresql://mlflow:***@db:5432/mlflow" in out and "http://host/ok" in out


def test_no_secret_reaches_logged_params_or_tags(tmp_path: Path, em_data: Path, mlflow_server) -> None:
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret-value-123", "MLFLOW_TRACKING_PASSWORD": "tracking-pw-456",
               "HF_TOKEN": "hf_token_value_789"}
    env = {**os.environ, **secrets}
    port = mlflow_server.uri.rsplit(":", 1)[1]
    uri_with_password = f"http://alice:uri-password-000@127.0.0.1:{port}"
    res = subprocess.run(
        [sys.executable, "-m", "segtune.cli", "train", str(DEMO), "--out", str(tmp_path / "out"),
         "--tracking-uri", uri_with_password,
         # A secret pasted into a config value by mistake is masked too.
         "--set", f"prompt.text={secrets['HF_TOKEN']}",
         "--set", f"dataset.root={em_data}", "--set", f"dataset.cache_dir={em_data / 'cache'}",
         "--set", "dataset.max_train=4", "--set", "dataset.max_eval=4", "--set", "train.epochs=1",
         "--set", "tracking.experiment=secrets"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert runs
    logged = " ".join(f"{k}={v}" for r in runs for d in (r.data.params, r.data.tags) for k, v in d.items())
    assert "tracking.uri" in logged  # the field is logged, its password is not
    for value in [*secrets.values(), "uri-password-000"]:
        assert value not in logged
