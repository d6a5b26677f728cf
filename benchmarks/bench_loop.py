"""Benchmark 1: `run_trial` vs a plain PyTorch loop written here, same tiny model, data, epochs.

Goals: <=1.05x without tracking, <=1.10x with MLflow logging on (a real local server). Both
sides train, validate each epoch and test once; `run_trial` also checkpoints each epoch, as a
trial must for Tune. Reduced size: tiny SAM, full policy, 3 epochs over 16 training samples
(`--epochs N` for longer trials, over which the fixed per-trial costs spread).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import config, store, verdict, workdir
from segtune.losses import LOSSES
from segtune.metrics import dice, masks_from_logits
from segtune.models import build_model
from segtune.train import TrialContext, make_loaders, run_trial

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
    run_trial(cfg, TrialContext(store=path, workdir=root / f"trial-{time.time_ns()}", tracker=tracker, log=lambda _: None))
    return time.perf_counter() - t


def main(epochs: int = 3) -> None:
    from tracking.runs import TrialRun
    from tracking.server import LocalServer, free_port

    root = workdir("loop")
    sets = [*SETS, f"train.epochs={epochs}"]
    cfg = config(root, *sets)
    path = store(cfg)
    ours(cfg, path, root)  # warm-up: first-call costs (imports, allocator) hit neither side below
    base = min(plain(cfg, path) for _ in range(2))
    mine = min(ours(cfg, path, root) for _ in range(2))
    print(f"plain loop {base:.2f}s, run_trial (no tracking) {mine:.2f}s")
    verdict("loop vs plain, no tracking", mine / base, "<=1.05x", mine / base <= 1.05)
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        cfg = config(root, *sets, f"tracking.uri={info.uri}", "tracking.experiment=bench")
        times = []
        for i in range(2):
            tracker = TrialRun.open(info.uri, "bench", sweep_id="bench", trial_id=f"t{i}", parent_run_id=None,
                                    params={}, tags={})
            times.append(ours(cfg, path, root, tracker))
        tracked = min(times)
    print(f"run_trial with MLflow logging {tracked:.2f}s")
    verdict("loop vs plain, MLflow on", tracked / base, "<=1.10x", tracked / base <= 1.10,
            "tracked side also uploads the best checkpoint and overlays at the end")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (fixed per-trial costs weigh less with more)")
    torch.set_num_threads(1)
    main(parser.parse_args().epochs)
