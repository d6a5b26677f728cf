"""`segtune demo`: the whole path once, on synthetic data, from nothing to a promoted champion.

1. synthetic EM stacks in the EPFL layout, cut into 256x256 patches (empty ones dropped);
2. a local MLflow server (unless --tracking-uri names one);
3. the sweep of experiments/demo.yaml: Ray Tune, Optuna TPE, ASHA, a tiny SAM;
4. promotion of the best trial by val/dice_best to segtune-sam_tiny-synthetic_em@champion;
5. a table of the trials, the champion, the untrained baseline, and where to look.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# `--quick`: the same path with 3 short trials on fewer patches, for the test suite.
QUICK = [
    "search.num_samples=3",
    "search.space.train.epochs={randint: [1, 2]}",
    "search.space.train.batch_size={choice: [4, 8]}",
    "search.grace_period=1",
    "dataset.max_train=16",
    "dataset.max_eval=8",
]


def run_demo(file: Path, *, tracking_uri: str | None, quick: bool, home: Path, overrides: list[str],
             log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns what it printed at the end (for tests)."""
    from segtune.config import load_config
    from segtune.launch import prepare_data, sweep, untrained_test_iou
    from segtune.report import print_runs, promote_and_print
    from tracking.server import check_server, start_server

    t0 = time.time()
    server = None
    if tracking_uri is None:
        log(f"[1/4] starting a local MLflow server (data in {home}) ...")
        server = start_server(home.resolve())
        tracking_uri = server.uri
    else:
        log(f"[1/4] using the MLflow server at {tracking_uri}")
        check_server(tracking_uri)
    log(f"      tracking at {tracking_uri}")
    cfg = load_config(file, (QUICK if quick else []) + overrides + [f"tracking.uri={tracking_uri}"])

    log(f"[2/4] synthetic EM data in {cfg.dataset.root} -> 256x256 patches")
    store, _ = prepare_data(cfg, log=lambda line: log(f"      {line}"))
    baseline = untrained_test_iou(cfg, store)

    log(f"[3/4] sweep: {cfg.search.num_samples} trials, Optuna TPE + ASHA on {cfg.search.metric}, "
        f"{cfg.search.max_concurrent} at a time")
    outcome = sweep(cfg, log=log)

    log("[4/4] promoting the best trial by val/dice_best")
    promotion = promote_and_print(tracking_uri, cfg.tracking.experiment, sweep_id=outcome.sweep_id, log=log)
    print_runs(tracking_uri, cfg.tracking.experiment, outcome.sweep_id, champion_run=promotion.run_id)

    from mlflow.tracking import MlflowClient

    champion = MlflowClient(tracking_uri).get_run(promotion.run_id).data.metrics
    log(f"champion: {promotion.model_uri} (v{promotion.version}) — val/dice_best "
        f"{champion['val/dice_best']:.3f}, test/iou {champion['test/iou']:.3f}; "
        f"untrained model test/iou {baseline:.3f}")
    log(f"finished in {time.time() - t0:.0f} s")
    exp_id = MlflowClient(tracking_uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id
    log(f"Browse the runs: {tracking_uri}/#/experiments/{exp_id}")
    if server is not None:
        log(server.ui_hint())
        log(f"The server keeps running; stop it with `segtune server stop --home {home}`.")
    return {"sweep_id": outcome.sweep_id, "champion": promotion, "test_iou": champion["test/iou"],
            "untrained_test_iou": baseline}
