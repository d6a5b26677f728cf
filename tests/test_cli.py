"""The `segtune` command line: help, clear errors for user mistakes, and the quick demo end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import DEMO

SEGTUNE = [sys.executable, "-m", "segtune.cli"]
COMMANDS = ["demo", "sweep", "train", "promote", "runs", "server"]


def cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGTUNE, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_command_and_each_has_help() -> None:
    res = cli("--help")
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout
        sub = cli(name, "--help")
        assert sub.returncode == 0 and "Usage" in sub.stdout, name
    assert "start" in cli("server", "--help").stdout
    assert "--install-completion" in res.stdout and "--version" in res.stdout


def test_unreachable_tracking_server_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.time()
    res = cli("sweep", str(DEMO), "--tracking-uri", uri, cwd=tmp_path)
    assert res.returncode == 1
    assert uri in res.stderr and "Traceback" not in res.stderr
    assert time.time() - started < 60
    # Nothing started: no data prepared, no Ray results.
    assert not (tmp_path / ".segtune").exists()


def test_mlflow_tracking_uri_from_the_environment_is_used(tmp_path: Path) -> None:
    # As MLflow's own tools: without --tracking-uri, $MLFLOW_TRACKING_URI names the server.
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for args in (["runs", "demo"], ["sweep", str(DEMO)]):
        res = subprocess.run([*SEGTUNE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
        assert res.returncode == 1 and uri in res.stderr, (args, res.stderr)


def test_wrong_config_key_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("  lr: 1.0e-3", "  lrr: 1.0e-3"))
    res = cli("sweep", str(bad), cwd=tmp_path)
    assert res.returncode == 1
    assert "bad.yaml" in res.stderr and "train.lrr" in res.stderr and "Traceback" not in res.stderr


def test_set_override_with_bad_value_names_field(tmp_path: Path) -> None:
    res = cli("train", str(DEMO), "--set", "train.epochs=many", "--no-track", cwd=tmp_path)
    assert res.returncode == 1 and "train.epochs" in res.stderr and "Traceback" not in res.stderr


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"segtune {version('segtune')}"


def test_print_config_shows_the_resolved_experiment_and_launches_nothing(tmp_path: Path) -> None:
    import yaml

    from segtune.config import load_config

    res = cli("sweep", str(DEMO), "--set", "train.lr=3e-4", "--set", "search.num_samples=5",
              "--tracking-uri", "http://alice:s3cret@tracking.example:5000", "--print-config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "s3cret" not in res.stdout and "alice" in res.stdout
    shown = yaml.safe_load(res.stdout)
    assert shown["train"]["lr"] == 3e-4 and shown["search"]["num_samples"] == 5
    assert list(tmp_path.iterdir()) == [], "--print-config must not prepare data or start anything"
    # What it prints is an experiment file that loads back to the same settings.
    again = tmp_path / "resolved.yaml"
    again.write_text(res.stdout)
    expected = load_config(DEMO, ["train.lr=3e-4", "search.num_samples=5"]).model_dump(mode="json")
    loaded = load_config(again).model_dump(mode="json")
    assert {k: v for k, v in loaded.items() if k != "tracking"} == \
        {k: v for k, v in expected.items() if k != "tracking"}
    # A mistake in an override is still caught when the file loads.
    bad = cli("train", str(DEMO), "--set", "train.epochs=many", "--print-config", cwd=tmp_path)
    assert bad.returncode == 1 and "train.epochs" in bad.stderr


def test_server_status_without_server(tmp_path: Path) -> None:
    res = cli("server", "status", "--home", str(tmp_path / "none"))
    assert res.returncode == 1 and "no server" in res.stdout


def test_demo_quick_end_to_end(tmp_path: Path, mlflow_server) -> None:
    """`segtune demo --quick --repeats` (the plain `--quick` runs in tests/test_install.py, from the
    wheel): one configuration of 3 seeds per pair, sweep -> trial -> member runs, champion a member."""
    res = cli("demo", "--quick", "--repeats", "--tracking-uri", mlflow_server.uri,
              "--set", "tracking.experiment=demo-quick-test", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "untrained test/iou" in out  # the pair comparison table
    for pair in ("sam_tiny", "clipseg_tiny"):
        assert f"segtune-{pair}-synthetic_em@champion" in out
    # The EPFL layout was written under the working directory's .segtune/data.
    data = tmp_path / ".segtune" / "data" / "synthetic_em"
    for name in ("training.tif", "training_groundtruth.tif", "testing.tif", "testing_groundtruth.tif"):
        assert (data / name).is_file()
    client = MlflowClient(mlflow_server.uri)
    for pair in ("sam_tiny", "clipseg_tiny"):
        version = client.get_model_version_by_alias(f"segtune-{pair}-synthetic_em", "champion")
        champion = client.get_run(version.tags["segtune.run_id"])
        assert champion.data.tags["segtune.kind"] == "member"  # the best member of the LCB's best trial
        assert champion.data.tags["segtune.model"] == pair
    exp = client.get_experiment_by_name("demo-quick-test")
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    kind = {r.info.run_id: r.data.tags.get("segtune.kind") for r in runs}
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    trials = [rid for rid, k in kind.items() if k == "trial"]
    members = [rid for rid, k in kind.items() if k == "member"]
    assert len(trials) == 2 and len(members) == 6  # 1 configuration x 3 seeds per pair
    assert all(kind[parent[t]] == "sweep" for t in trials)  # three levels: sweep -> trial -> member
    assert all(parent[m] in trials for m in members)
    for t in trials:
        assert {"val/dice_mean", "val/dice_std", "val/dice_lcb"} <= set(by_id[t].data.metrics)


def test_train_runs_one_trial_without_ray(tmp_path: Path, em_data: Path, mlflow_server) -> None:
    res = cli("train", str(DEMO), "--tracking-uri", mlflow_server.uri, "--out", str(tmp_path / "out"),
              "--set", f"dataset.root={em_data}", "--set", f"dataset.cache_dir={em_data / 'cache'}",
              "--set", "dataset.max_train=8", "--set", "dataset.max_eval=4", "--set", "train.epochs=1",
              "--set", "tracking.experiment=train-cli", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test/iou" in res.stdout
    assert (tmp_path / "out" / "checkpoints" / "best" / "model.safetensors").is_file()
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name("train-cli").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "test/iou" in runs[0].data.metrics
    assert "mlflow.parentRunId" not in runs[0].data.tags


def test_server_start_status_stop(tmp_path: Path) -> None:
    home = str(tmp_path / "srv")
    started = cli("server", "start", "--home", home, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert "http://127.0.0.1:" in started.stdout
        status = cli("server", "status", "--home", home)
        assert status.returncode == 0 and "running" in status.stdout
    finally:
        stopped = cli("server", "stop", "--home", home, timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert cli("server", "status", "--home", home).returncode == 1
