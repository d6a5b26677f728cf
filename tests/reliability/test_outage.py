"""A tracking server that goes away mid-sweep: trials keep training, nothing is lost or doubled."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from tests.reliability.harness import check_complete, start, wait_for_metric, write_experiment
from tracking.server import start_server, stop_server


def test_mid_sweep_outage_loses_and_duplicates_nothing(tmp_path, em_data) -> None:
    home = tmp_path / "mlflow"
    server = start_server(home)
    try:
        name = "outage"
        file = write_experiment(tmp_path, em_data, server.uri, name, samples=2, epochs=10, scheduler="fifo")
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
        check_complete(server.uri, name, samples=2, epochs=10)
        assert not list((tmp_path / "spool").glob("*.jsonl")), "spooled data left undelivered"
        client = MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id],
                                  filter_string="tags.`segtune.kind` = 'trial'")
        for run in runs:  # the best checkpoint arrived too, with its manifest
            names = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "checkpoints/best")}
            assert {"model.safetensors", "manifest.json"} <= names
    finally:
        stop_server(home)
