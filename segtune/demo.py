"""`segtune demo`: the whole path once, on synthetic data, from nothing to a promoted champion.

1. synthetic EM stacks in the EPFL layout, cut into 256x256 patches (empty ones dropped);
2. a local MLflow server (unless --tracking-uri names one);
3. two sweeps, experiments/demo.yaml (a tiny SAM, point prompts) and demo_clipseg.yaml (a tiny
   CLIPSeg, text prompts): Ray Tune, Optuna TPE, ASHA;
4. promotion of each sweep's best trial by val/dice_best, gated and approved in one step
   (`segtune promote --approve`: segtune-<model>-synthetic_em@champion);
5. tables of the trials, a comparison of the two pairs with their untrained baselines, and
   where to look.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segtune.config import ExperimentConfig
    from tracking.registry import Promotion

# `--quick`: the same path with 3 short trials on fewer patches, for the test suite.
QUICK = [
    "search.num_samples=3",
    "search.space.train.epochs={randint: [1, 2]}",
    "search.space.train.batch_size={choice: [4, 8]}",
    "search.grace_period=1",
    "dataset.max_train=16",
    "dataset.max_eval=8",
]


def repeat_overrides(quick: bool) -> list[str]:
    """`--repeats`: 3 seeds per configuration, a third as many configurations (about the same
    training budget), ASHA and Optuna on the mean and the champion chosen by the lower
    confidence bound of validation Dice (see README, "Repeats")."""
    return ["search.repeats={seeds: 3}", "search.metric=val/dice_lcb",
            f"search.num_samples={1 if quick else 3}"]


@dataclass
class PairResult:
    """One model/dataset pair of the demo: its sweep, champion and baseline."""

    key: str
    sweep_id: str
    trials: int
    champion: Promotion
    val_dice_best: float
    test_iou: float
    untrained_test_iou: float


def run_demo(files: list[Path], *, tracking_uri: str | None, quick: bool, home: Path, overrides: list[str],
             repeats: bool = False, log: Callable[[str], None] = print) -> list[PairResult]:
    """Run the demo over each experiment file (one model/dataset pair each); returns their results."""
    from mlflow.tracking import MlflowClient

    from segtune.commands import run_sweep, untrained_test_iou
    from segtune.config import load_config
    from segtune.console import print_pairs, print_runs
    from segtune.prepare import prepare_data
    from tracking.server import check_server, start_server
    from tracking.urls import experiment_runs_url

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
    sets = (QUICK if quick else []) + (repeat_overrides(quick) if repeats else []) + overrides
    cfgs = [load_config(f, sets + [f"tracking.uri={tracking_uri}"]) for f in files]

    log(f"[2/4] synthetic EM data in {cfgs[0].dataset.root} -> 256x256 patches")
    results = []
    for n, cfg in enumerate(cfgs, 1):
        store, _ = prepare_data(cfg, log=lambda line: log(f"      {line}"))
        baseline = untrained_test_iou(cfg, store)
        members = f" of {cfg.search.repeats.k} seeds each" if cfg.search.repeats else ""
        log(f"[3/4] sweep {n}/{len(cfgs)}: {cfg.model.key} on {cfg.dataset.name}, {cfg.search.num_samples} trials"
            f"{members}, Optuna TPE + ASHA on {cfg.search.metric}, {cfg.search.max_concurrent} at a time")
        outcome = run_sweep(cfg, log=log)
        how = "val/dice_lcb (its best member)" if cfg.search.repeats else "val/dice_best"
        log(f"[4/4] promoting the best {cfg.model.key} trial by {how}, gated, approved")
        promotion = _promote(tracking_uri, cfg, outcome.sweep_id, log)
        print_runs(tracking_uri, cfg.tracking.experiment, outcome.sweep_id, champion_run=promotion.run_id)
        best = MlflowClient(tracking_uri).get_run(promotion.run_id).data.metrics
        results.append(PairResult(f"{cfg.model.key} / {cfg.dataset.name}", outcome.sweep_id, cfg.search.num_samples,
                                  promotion, best["val/dice_best"], best["test/iou"], baseline))

    print_pairs(results)
    log(f"finished in {time.time() - t0:.0f} s")
    url = experiment_runs_url(tracking_uri, cfgs[0].tracking.experiment)  # its runs, not MLflow 3's GenAI overview
    if url:
        log(f"Browse the runs: {url}")
    if server is not None:
        log(server.ui_hint())
        log(f"The server keeps running; stop it with `segtune server stop --home {home}`.")
    return results


def _promote(uri: str, cfg: ExperimentConfig, sweep_id: str, log: Callable[[str], None]) -> Promotion:
    """`segtune promote --approve` for the sweep; when a gate stops it (e.g. an earlier demo's
    champion on this server scores better), the champion that stays is the pair's result."""
    from mlflow.tracking import MlflowClient

    from segtune.commands import promote_best
    from segtune.errors import GateError
    from tracking.registry import Promotion, champion_of

    try:
        return promote_best(uri, cfg.tracking.experiment, sweep_id=sweep_id, approve=True,
                            reason="segtune demo: the sweep's best trial", log=log)
    except GateError as err:
        log(f"      {err}")
    name = f"segtune-{cfg.model.key}-{cfg.dataset.name}"
    champion = champion_of(MlflowClient(uri), name)
    if champion is None:
        raise GateError(f"{name}: the sweep's best version failed its gates and there is no champion; "
                        "see the version's gate report in the MLflow registry.")
    log(f"      '{name}@champion' stays on v{champion.version}")
    tags = champion.tags
    return Promotion(name, champion.version, "champion", tags["segtune.run_id"], tags.get("segtune.metric", ""),
                     float(tags.get("segtune.metric_value", "nan")), tags.get("segtune.sha256", ""),
                     f"models:/{name}@champion", approved=True)
