"""Security: the local server's host check, and no secret in any logged param or tag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-secret-value-123", "MLFLOW_TRACKING_PASSWORD": "tracking-pw-456",
           "HF_TOKEN": "hf_token_value_789"}
URI_PASSWORD = "uri-password-000"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "segtune.cli", *args], cwd=cwd, env={**os.environ, **SECRETS},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _no_secret_in(text: str, where: str) -> None:
    for value in [*SECRETS.values(), URI_PASSWORD]:
        assert value not in text, f"{value} in {where}"


@pytest.fixture(scope="module")
def secret_trial(tmp_path_factory, em_data: Path, mlflow_server):
    """A trial logged through a tracking URI with a password, secrets in the environment and one
    pasted into a config value: (its work folder, the URI, its run, what the CLI printed)."""
    tmp = tmp_path_factory.mktemp("secrets")
    port = mlflow_server.uri.rsplit(":", 1)[1]
    uri_with_password = f"http://alice:{URI_PASSWORD}@127.0.0.1:{port}"
    res = _cli("train", str(DEMO), "--out", str(tmp / "out"), "--tracking-uri", uri_with_password,
               # A secret pasted into a config value by mistake is masked too.
               "--set", f"prompt.text={SECRETS['HF_TOKEN']}",
               "--set", f"dataset.root={em_data}", "--set", f"dataset.cache_dir={em_data / 'cache'}",
               "--set", "dataset.max_train=4", "--set", "dataset.max_eval=4", "--set", "train.epochs=1",
               "--set", "tracking.experiment=secrets", cwd=tmp)
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) == 1
    return tmp, uri_with_password, runs[0], res.stdout + res.stderr


def test_no_secret_reaches_logged_params_or_tags(secret_trial) -> None:
    _, _, run, printed = secret_trial
    logged = " ".join(f"{k}={v}" for d in (run.data.params, run.data.tags) for k, v in d.items())
    assert "tracking.uri" in logged  # the field is logged, its password is not
    _no_secret_in(logged, "params and tags")
    _no_secret_in(printed, "what segtune train printed")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_no_secret_in_any_file_of_the_trial_or_its_registered_model(secret_trial, mlflow_server) -> None:
    import mlflow

    tmp, uri_with_password, run, _ = secret_trial
    rid = run.info.run_id
    name = "segtune-secrets-test"
    res = _cli("promote", "secrets", "--run", rid, "--name", name, "--approve", "--reason", "secret check",
               "--tracking-uri", uri_with_password, cwd=tmp)
    _no_secret_in(res.stdout + res.stderr, "what segtune promote printed")
    assert "gates passed" in res.stdout
    client = MlflowClient(mlflow_server.uri)
    version = client.get_model_version_by_alias(name, "champion")
    _no_secret_in(" ".join(f"{k}={v}" for k, v in version.tags.items()) + version.description, "version tags")

    uploaded = Path(client.download_artifacts(rid, "", str(tmp / "run-artifacts")))
    mlflow.set_tracking_uri(mlflow_server.uri)
    registered = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}",
                                                          dst_path=str(tmp / "model-artifacts")))
    files = {**{f"run:{k}": v for k, v in _files(uploaded).items()},
             **{f"model:{k}": v for k, v in _files(registered).items()},
             **{f"local:{k}": v for k, v in _files(tmp / "out").items()}}  # what segtune wrote here
    assert "run:checkpoints/best/state.json" in files and f"run:gates/{name}-v{version.version}.md" in files
    assert "model:artifacts/model/state.json" in files and "model:artifacts/model/model.safetensors" in files
    state = json.loads(files["model:artifacts/model/state.json"])
    assert state["config"]["tracking"]["uri"] == f"http://alice:***@127.0.0.1:{mlflow_server.uri.rsplit(':', 1)[1]}"
    assert state["config"]["prompt"]["text"] == "***"
    for where, data in files.items():
        for value in [*SECRETS.values(), URI_PASSWORD]:
            assert value.encode() not in data, f"{value} in {where}"
