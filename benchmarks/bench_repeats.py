"""Benchmark: does `search.repeats: {seeds: 3}` make the champion a sweep picks more dependable?

N independent sweeps (each its own searcher seed and train.seed) of equal budget in
trial-epochs on the synthetic EM task with tiny SAM, with and without repeats: without,
`num_samples` configurations; with, a third as many configurations of 3 members each. Each
sweep's champion is what `segtune promote` would register (the best val/dice_best; with
repeats, the best val/dice_lcb trial's best member), read back from MLflow, and its test IoU
is recorded. Reported: std over sweeps of the champion's test IoU without / with repeats (the
ratio; goal >= 2x) and both means (goal: no loss of mean).

    .venv/bin/python -m benchmarks.bench_repeats            # 10 sweeps a side, 9 trials x 4 epochs
    .venv/bin/python -m benchmarks.bench_repeats --quick    # 3 sweeps a side, 3 trials x 2 epochs
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.common import config, store, verdict, workdir


def champion_test_iou(uri: str, experiment: str, sweep_id: str, repeats: bool) -> float:
    """The test IoU of the run `segtune promote` would register for this sweep."""
    from tracking.registry import best_member, select_best
    from tracking.runs import trial_runs

    trials = trial_runs(uri, experiment, sweep_id)
    best = select_best(trials, "val/dice_lcb" if repeats else "val/dice_best")
    chosen = best_member(uri, best) if repeats else best
    return float(chosen.data.metrics["test/iou"])


def one_sweep(root, uri: str, seed: int, repeats: bool, trials: int, epochs: int, max_train: int) -> float:
    from segtune.commands import run_sweep

    experiment = f"bench-repeats-{'rep' if repeats else 'one'}-{seed}"
    sets = [f"tracking.uri={uri}", f"tracking.experiment={experiment}", f"tracking.spool_dir={root / 'spool'}",
            f"train.seed={seed}", f"dataset.max_train={max_train}", "dataset.max_eval=16",
            f"search.num_samples={trials // 3 if repeats else trials}", "search.max_concurrent=2",
            f"search.space.train.epochs={{choice: [{epochs}]}}", "search.space.train.batch_size={choice: [4]}",
            "search.finalists=0"]
    if repeats:
        sets += ["search.repeats={seeds: 3}", "search.metric=val/dice_lcb"]
    cfg = config(root, *sets)
    store(cfg)
    outcome = run_sweep(cfg, log=lambda _: None)
    return champion_test_iou(uri, experiment, outcome.sweep_id, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sweeps a side, 3 trials of 2 epochs")
    parser.add_argument("--sweeps", type=int, default=None)
    args = parser.parse_args()
    sweeps = args.sweeps or (3 if args.quick else 10)
    trials, epochs, max_train = (3, 2, 16) if args.quick else (9, 4, 64)

    from tracking.server import LocalServer, free_port

    root = workdir("repeats")
    with LocalServer(root / "mlflow", port=free_port(0)) as server:
        got: dict[bool, list[float]] = {False: [], True: []}
        for seed in range(sweeps):
            for repeats in (False, True):
                iou = one_sweep(root, server.uri, seed, repeats, trials, epochs, max_train)
                got[repeats].append(iou)
                print(f"sweep {seed} {'repeats 3' if repeats else 'single  '}: champion test IoU {iou:.4f}", flush=True)
    spread = {k: statistics.stdev(v) for k, v in got.items()}
    means = {k: statistics.fmean(v) for k, v in got.items()}
    print(f"champion test IoU over {sweeps} sweeps of {trials * epochs} trial-epochs each: "
          f"single {means[False]:.4f} +- {spread[False]:.4f}, repeats {means[True]:.4f} +- {spread[True]:.4f}")
    ratio = spread[False] / spread[True] if spread[True] > 0 else float("inf")
    verdict("repeats_spread", ratio, ">=2x less spread, no loss of mean",
            ratio >= 2 and means[True] >= means[False] - spread[False] / sweeps ** 0.5,
            note=f"mean test IoU single {means[False]:.4f} vs repeats {means[True]:.4f}")


if __name__ == "__main__":
    main()
