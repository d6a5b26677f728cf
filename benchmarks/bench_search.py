"""Benchmark 5: TPE + ASHA vs random search without pruning, same budget of trial-epochs.

In-process Optuna (TPESampler + SuccessiveHalvingPruner, the asynchronous successive halving
ASHA is; vs RandomSampler, no pruning) over the synthetic EM task with tiny SAM, 3 seeds.
Reported: trial-epochs TPE+ASHA needed to reach random search's best val/dice, as a share of
the budget random search used. Reduced: budget 24 trial-epochs, up to 4 epochs a trial, 16
training samples. Goal <=40%.
"""

from __future__ import annotations

import optuna
import torch

from benchmarks.common import config, store, verdict, workdir
from segtune.loaders import make_loaders
from segtune.losses import LOSSES
from segtune.models import build_model
from segtune.scoring import score_loader
from segtune.train import build_optimizer

BUDGET, MAX_EPOCHS, SEEDS = 24, 4, (0, 1, 2)


class Budget:
    """Counts trial-epochs and the best val/dice after each."""

    def __init__(self) -> None:
        self.used, self.curve = 0, []  # curve[i]: best val/dice after i+1 trial-epochs

    def record(self, value: float) -> None:
        self.used += 1
        self.curve.append(max(value, self.curve[-1] if self.curve else 0.0))


def objective(root, path, budget: Budget, prune: bool):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)

    def run(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-5, 3e-2, log=True)
        bs = trial.suggest_categorical("batch_size", [2, 4, 8])
        cfg = config(root, "dataset.max_train=16", "dataset.max_eval=8", f"train.lr={lr}", f"train.batch_size={bs}")
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        train, val, _, collate = make_loaders(cfg, path, lambda _: None)
        best = 0.0
        for epoch in range(1, MAX_EPOCHS + 1):
            if budget.used >= BUDGET:
                break
            collate.epoch = epoch
            model.train()
            for b in train:
                loss = LOSSES["dice"](model(b["image"], b["prompts"]), b["mask"])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = score_loader(model, val, accelerator=acc)[0]["dice"]
            budget.record(value)
            best = max(best, value)
            trial.report(value, epoch)
            if prune and trial.should_prune():
                raise optuna.TrialPruned()
        return best

    return run


def search(root, path, seed: int, tpe: bool) -> Budget:
    budget = Budget()
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=3) if tpe
               else optuna.samplers.RandomSampler(seed=seed))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2) if tpe else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    while budget.used < BUDGET:
        study.optimize(objective(root, path, budget, tpe), n_trials=1)
    return budget


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = workdir("search")
    path = store(config(root))
    shares = []
    for seed in SEEDS:
        rand, tpe = search(root, path, seed, False), search(root, path, seed, True)
        target = rand.curve[-1]
        reached = next((i + 1 for i, v in enumerate(tpe.curve) if v >= target), None)
        share = (reached or float("inf")) / rand.used
        shares.append(share)
        print(f"seed {seed}: random best {target:.4f} after {rand.used} epochs; TPE+ASHA best {tpe.curve[-1]:.4f}, "
              f"reached random's best after {reached if reached else 'never (within budget)'} epochs")
    mean = sum(shares) / len(shares)
    verdict("search TPE+ASHA epochs to random's best", mean, "<=0.40 of random's budget", mean <= 0.40,
            "mean over 3 seeds; inf when not reached within the budget")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
