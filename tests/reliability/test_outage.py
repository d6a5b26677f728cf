"""A tracking server that goes away mid-sweep: trials (and their members) keep training, nothing is
lost or doubled."""

from __future__ import annotations

import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.reliability.harness import check_complete, start, wait_for_metric, write_experiment
from tracking.server import start_server, stop_server


@pytest.mark.chaos  # a ten-epoch sweep around a server restart: `make test-chaos` (CI runs it too)
def test_mid_sweep_outage_loses_and_duplicates_nothing(tmp_path, em_data) -> None:
    home = tmp_path / "mlflow"
    server = start_server(home)
    try:
        name = "outage"
        # One configuration of two members (search.repeats): the trial run's aggregates and each
        # member run's curve and checkpoint go through the spool alike.
        file = write_experiment(tmp_path, em_data, server.uri, name, samples=1, epochs=10, scheduler="fifo")
        raw = yaml.safe_load(file.read_text())
        raw["search"]["repeats"] = {"seeds": 2}
        file.write_text(yaml.safe_dump(raw))
        proc = start(file, cwd=tmp_path)
        wait_for_metric(server.uri, name, proc)
        stop_server(home)
        # Longer than a trial's client retries (2 retries, 1 s backoff): the trials must spool.
        spooled, deadline = False, time.time() + 15
        while time.time() < deadline:
            spooled = spooled or any((tmp_path / "spool").glob("*.jsonl"))
            time.sleep(0.5)
        assert spooled, "no trial spooled anything while the server was down"
        assert proc.poll() is None, "the sweep died with its tracking server"
        server = start_server(home, port=server.port)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        check_complete(server.uri, name, samples=1, epochs=10)
        assert not list((tmp_path / "spool").glob("*.jsonl")), "spooled data left undelivered"
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(name).experiment_id
        (trial,) = client.search_runs([exp], filter_string="tags.`segtune.kind` = 'trial'")
        lcb = [m.step for m in client.get_metric_history(trial.info.run_id, "val/dice_lcb")]
        assert sorted(lcb) == list(range(1, 11)), lcb  # every epoch's aggregate, once
        members = client.search_runs([exp], filter_string="tags.`segtune.kind` = 'member'")
        assert len(members) == 2
        for run in members:  # each member's curve once, and its best checkpoint with its manifest
            assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == trial.info.run_id
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/dice")]
            assert sorted(steps) == list(range(1, 11)), steps
            names = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
            assert {"model.safetensors", "manifest.json"} <= names
    finally:
        stop_server(home)
