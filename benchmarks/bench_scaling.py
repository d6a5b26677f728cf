"""Benchmark 8: sweep wall time for 4, 8 and 16 trials — does the cost grow linearly?

Three real sweeps (`segtune.commands.run_sweep`: local Ray, Optuna, FIFO so every trial runs all its
epochs, a real local MLflow server), identical but for `search.num_samples`, at concurrency 2.
Linear scaling means every added trial costs the same: the ratio judged is the marginal cost
per added trial from 8 to 16 over that from 4 to 8 (1.0 is linear, above 1 is worse). Seconds
per trial are printed too, but they fall with any fixed start-up (each sweep pays Ray's start
once), so they cannot show growth that is worse than linear. A 2-trial sweep runs
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
    early, late = (walls[b] - walls[a]) / (b - a), (walls[c] - walls[b]) / (c - b)
    print(f"marginal cost per added trial: {early:.2f}s from {a} to {b}, {late:.2f}s from {b} to {c} "
          f"(equal when growth is linear); s/trial at {c} over s/trial at {a}: "
          f"{per_trial[c] / per_trial[a]:.3f}x (amortised start-up, not the verdict)")
    # Linear means each added trial costs what the earlier ones did: judged on the marginal cost,
    # not on seconds per trial, which falls with any fixed start-up however the rest grows.
    verdict(f"scaling, marginal s/trial {b}->{c} over {a}->{b}", late / early, "<=1.10x", late / early <= 1.10)


if __name__ == "__main__":
    main()
