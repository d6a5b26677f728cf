"""Benchmark 7: our logging path (buffered, one log_batch per epoch) vs one log_metric per value.

Against a real local MLflow server (SQLite) started and stopped here; goal >=10x per metric.
"""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from benchmarks.common import verdict, workdir
from tracking.runs import TrialRun
from tracking.server import LocalServer, free_port

EPOCHS, PER_EPOCH = 20, 50  # 1,000 values


def main() -> None:
    root = workdir("tracking")
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        client = MlflowClient(info.uri)
        ours = TrialRun.open(info.uri, "bench", sweep_id="b", trial_id="ours", parent_run_id=None, params={}, tags={})
        t = time.perf_counter()
        for epoch in range(EPOCHS):
            ours.log_metrics({f"m{k}": float(k * epoch) for k in range(PER_EPOCH)}, step=epoch)
            ours.flush()  # what run_trial does at each epoch end
        batched = time.perf_counter() - t
        single = TrialRun.open(info.uri, "bench", sweep_id="b", trial_id="single", parent_run_id=None, params={}, tags={})
        t = time.perf_counter()
        for epoch in range(EPOCHS):
            for k in range(PER_EPOCH):
                client.log_metric(single.run_id, f"m{k}", float(k * epoch), step=epoch)
        each = time.perf_counter() - t
        n = EPOCHS * PER_EPOCH
        assert len(client.get_metric_history(ours.run_id, "m1")) == EPOCHS
    print(f"{n} values: log_batch path {1e3 * batched / n:.3f} ms/value, log_metric {1e3 * each / n:.3f} ms/value")
    verdict("tracking batch vs per-value", each / batched, ">=10x", each / batched >= 10)


if __name__ == "__main__":
    main()
