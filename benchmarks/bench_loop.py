"""Benchmark 1: `run_trial` vs a plain PyTorch loop written here, same tiny model, data, epochs.

Goals: <=1.05x without tracking, <=1.10x with MLflow logging on (a real local server). Both
sides train, validate each epoch and test once; `run_trial` also checkpoints each epoch, as a
trial must for Tune. Reduced size: tiny SAM, full policy, 3 epochs over 16 training samples
(`--epochs N` for longer trials, over which the fixed per-trial costs spread); each side's best
of 3 runs, the sides taken in turn (`--rounds`).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import config, store, verdict, workdir
from segtune.loaders import make_loaders
from segtune.losses import LOSSES
from segtune.metrics import dice, masks_from_logits
from segtune.models import build_model
from segtune.train import NullTracker, TrialContext, run_trial

SETS = ["dataset.max_train=16", "dataset.max_eval=8", "train.epochs=3", "train.batch_size=4", "model.train=full"]


def plain(cfg, path) -> float:
    """The loop a PyTorch user would write: no Accelerate, checkpoints or tracking."""
    t = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    train, val, test, collate = make_loaders(cfg, path, lambda _: None)
    loss_fn = LOSSES["dice"]
    for epoch in range(1, cfg.train.epochs + 1):
        collate.epoch = epoch
        model.train()
        for b in train:
            loss = loss_fn(model(b["image"], b["prompts"]), b["mask"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for loader in [val] + ([test] if epoch == cfg.train.epochs else []):
            model.eval()
            with torch.no_grad():
                for b in loader:
                    dice(masks_from_logits(model(b["image"], b["prompts"])), b["mask"] > 0.5)
    return time.perf_counter() - t


def ours(cfg, path, root, tracker=None) -> float:
    t = time.perf_counter()
    run_trial(cfg, TrialContext(store=path, workdir=root / f"trial-{time.time_ns()}", tracker=tracker or NullTracker(), log=lambda _: None))
    return time.perf_counter() - t


def main(epochs: int = 3, rounds: int = 3) -> None:
    from tracking.runs import TrialRun
    from tracking.server import LocalServer, free_port

    root = workdir("loop")
    sets = [*SETS, f"train.epochs={epochs}"]
    cfg = config(root, *sets)
    path = store(cfg)
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        tracking = [f"tracking.uri={info.uri}", "tracking.experiment=bench"]

        def tracked(*extra: str) -> float:
            tracker = TrialRun.open(info.uri, "bench", sweep_id="bench", trial_id=f"t{time.time_ns()}",
                                    parent_run_id=None, params={}, tags={})
            return ours(config(root, *sets, *tracking, *extra), path, root, tracker)

        sides = {
            "plain": lambda: plain(cfg, path),
            "ours": lambda: ours(cfg, path, root),
            "mlflow": tracked,
            # Without the validation overlays drawn every eval.overlay_every epochs: what metric
            # logging and the best checkpoint's upload cost on their own.
            "mlflow_no_overlays": lambda: tracked("eval.overlay_every=0"),
        }
        for side in sides.values():  # warm-up: first-call costs (imports, allocator, server) hit no timing
            side()
        # Rounds of every side in turn, best of each: a slow spell of the shared machine hits all
        # sides alike instead of whichever ran during it.
        times = {name: [] for name in sides}
        for _ in range(rounds):
            for name, side in sides.items():
                times[name].append(side())
    best = {name: min(t) for name, t in times.items()}
    base = best["plain"]
    print(f"best of {rounds}: plain loop {base:.2f}s, run_trial (no tracking) {best['ours']:.2f}s, "
          f"MLflow on {best['mlflow']:.2f}s, MLflow on without per-epoch overlays {best['mlflow_no_overlays']:.2f}s")
    ratio = best["ours"] / base
    verdict("loop vs plain, no tracking", ratio, "<=1.05x", ratio <= 1.05)
    ratio = best["mlflow"] / base
    verdict("loop vs plain, MLflow on", ratio, "<=1.10x", ratio <= 1.10,
            "tracked side also draws overlays, uploads the best checkpoint and test overlays")
    print(f"(MLflow on without per-epoch overlays: {best['mlflow_no_overlays'] / base:.3f}x)")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (fixed per-trial costs weigh less with more)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each side, taken in turn; the best counts")
    torch.set_num_threads(1)
    args = parser.parse_args()
    main(args.epochs, args.rounds)
