"""Benchmark 8: sweep wall time for 4, 8 and 16 trials — does the cost grow linearly?

Three real sweeps (`segtune.commands.run_sweep`: local Ray, Optuna, FIFO so every trial runs all its
epochs, a real local MLflow server), identical but for `search.num_samples`, at concurrency 2.
Linear scaling means the wall time per trial stays flat as the sweep grows; the ratio printed
is (seconds per trial at 16) / (seconds per trial at 4): 1.0 is linear, above 1 is worse.
Each sweep pays Ray's start once, so the 4-trial sweep carries the most fixed cost per trial;
the marginal cost of each added trial (4 -> 8, 8 -> 16) is printed too. A 2-trial sweep runs
first, untimed, so first-use costs in this process do not land on the 4-trial sweep.
Reduced: trials of a few seconds (tiny SAM, 2 epochs over 8 samples). Goal: <=1.10x.
"""

from __future__ import annotations

import time

from benchmarks.common import config, store, verdict, workdir

SIZES = (4, 8, 16)


def main() -> None:
    from segtune.commands import run_sweep
    from tracking.server import LocalServer, free_port

    root = workdir("scaling")
    per_trial, walls = {}, {}
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        for n in (2, *SIZES):  # the 2-trial sweep warms up (first imports, page cache); not counted
            cfg = config(root, "dataset.max_train=8", "dataset.max_eval=4", "train.epochs=2",
                         "search.space={train.lr: {loguniform: [3.0e-4, 1.0e-2]}}", f"search.num_samples={n}",
                         "search.max_concurrent=2", "search.scheduler=fifo",
                         f"tracking.uri={info.uri}", f"tracking.experiment=bench-{n}")
            store(cfg)
            t = time.perf_counter()
            run_sweep(cfg, log=lambda _: None)
            wall = time.perf_counter() - t
            per_trial[n], walls[n] = wall / n, wall
            print(f"{n:2d} trials at concurrency 2: wall {wall:6.1f}s, {per_trial[n]:.2f}s per trial", flush=True)
    a, b, c = SIZES
    print(f"marginal cost per added trial: {(walls[b] - walls[a]) / (b - a):.2f}s from {a} to {b}, "
          f"{(walls[c] - walls[b]) / (c - b):.2f}s from {b} to {c} (equal when growth is linear)")
    ratio = per_trial[c] / per_trial[a]
    verdict("scaling 4 -> 16 trials (s/trial at 16 over s/trial at 4)", ratio, "<=1.10x", ratio <= 1.10,
            "below 1: the sweep's fixed start-up is spread over more trials")


if __name__ == "__main__":
    main()
