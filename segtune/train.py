"""One trial: the Accelerate training loop for one model/dataset pair, with no Ray inside.

`run_trial(cfg, ctx)` reads top to bottom like Accelerate's `cv_example.py`: build the model,
optimizer and loaders, let the Accelerator prepare them, then per epoch train, validate,
checkpoint, log and report. After the last epoch it scores the test split with the best
epoch's checkpoint. Ray Tune (segtune.tune), Ray Train workers (segtune.distributed) and
`segtune train` all call it; what differs is in `TrialContext`: where to log, where to
report, where to write. An untracked trial logs to a `NullTracker`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader

from segtune.cache import for_trial
from segtune.checkpoint import (
    CARRIED,
    CheckpointWriter,
    link_copy,
    load_optimizer,
    load_weights,
    read_state,
)
from segtune.config import ExperimentConfig
from segtune.errors import ConfigError, TrainingError
from segtune.loaders import make_loaders
from segtune.losses import LOSSES
from segtune.models import Segmenter, build_model
from segtune.overlay_log import OverlayLog
from segtune.ray_compat import reset_accelerate_state
from segtune.scoring import ImageScore, forward_batch, score_loader


class Tracker(Protocol):
    """What a trial needs from its tracking run (tracking.runs.TrialRun implements it)."""

    #: True while nothing can receive an upload now (a spooling run, or no run at all):
    #: figures are skipped then.
    offline: bool

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def upload(self, local_dir: Path, artifact_path: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def fail(self, err: BaseException) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """The tracker of an untracked trial (`segtune train --no-track`): every call does nothing."""

    offline = True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_checkpoint(self, path: Path) -> None:
        pass

    def upload(self, local_dir: Path, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def fail(self, err: BaseException) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


@dataclass
class TrialContext:
    """Where a trial logs, reports and writes; the machine side of a trial, apart from its config."""

    store: Path
    workdir: Path
    tracker: Tracker = field(default_factory=NullTracker)
    # Called once per epoch with the epoch's metrics and checkpoint dir (Tune's or Ray Train's report).
    report_epoch: Callable[[dict[str, Any], Path], None] | None = None
    # A checkpoint to continue from (Tune's restored checkpoint after a failure).
    resume_from: Path | None = None
    log: Callable[[str], None] = print


def build_optimizer(cfg: ExperimentConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The `train.optimizer` over `params`, with `train.lr` and `train.weight_decay`."""
    t = cfg.train
    # One fused kernel per step instead of a loop over tensors, where PyTorch has it (CUDA).
    fused = {"fused": True} if torch.cuda.is_available() else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)


def train_epoch(model: Segmenter, loader: DataLoader, optimizer: torch.optim.Optimizer,
                accelerator: Accelerator, loss_fn: Callable) -> float:
    """One pass over the training loader; returns the mean loss."""
    model.train()
    total, n = 0.0, 0
    for batch in loader:
        with accelerator.autocast():
            logits = forward_batch(model, batch, accelerator.device)
            loss = loss_fn(logits, batch["mask"])
        if not torch.isfinite(loss):
            raise TrainingError(f"training loss became {loss.item()} (train.lr={optimizer.param_groups[0]['lr']:g}); "
                                "try a lower train.lr or precision: \"no\"")
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(batch["image"])
        n += len(batch["image"])
    # Every worker of a data-parallel trial saw its own shard: the mean is over all of them.
    sums = accelerator.reduce(torch.tensor([total, float(n)], device=accelerator.device), "sum")
    return (sums[0] / sums[1].clamp(min=1)).item()


def _accelerator(cfg: ExperimentConfig) -> Accelerator:
    """This trial's Accelerator, with its own precision and compile settings.

    Accelerate keeps them in process-wide state that the first Accelerator fixes; a Tune worker
    runs trial after trial (actor reuse), so that state is cleared first (the process group
    of a data-parallel trial is kept).
    """
    reset_accelerate_state()
    # Some parameters of a trainable group get no gradient in a given step (e.g. SAM's mask-prompt
    # embedding when prompts are points); DDP must be told, or a data-parallel step fails.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.precision,
                       dynamo_backend=cfg.train.compile,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def run_trial(cfg: ExperimentConfig, ctx: TrialContext) -> dict[str, Any]:
    """Train, validate and test one configuration; returns the final metrics."""
    torch.manual_seed(cfg.train.seed)
    accelerator = _accelerator(cfg)
    if cfg.train.loss not in LOSSES:
        raise ConfigError(f"train.loss: unknown loss {cfg.train.loss!r}; expected one of {', '.join(LOSSES)}")
    loss_fn = LOSSES[cfg.train.loss]
    # On the trial's device from the start: the embedding cache is encoded there (a GPU's work).
    model = build_model(cfg.model).to(accelerator.device)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    # Before any weights load: only trainable ones do, and the cache's key is the frozen encoder.
    cache = for_trial(cfg, model, ctx.store, ctx.log)
    train_dl, val_dl, test_dl, train_collate = make_loaders(cfg, ctx.store, ctx.log, cache)

    start_epoch, best = 0, {"dice": -math.inf, "epoch": 0}
    ckpt_dir, best_dir = ctx.workdir / "checkpoints" / "last", ctx.workdir / "checkpoints" / "best"
    if ctx.resume_from is not None:
        state = read_state(ctx.resume_from)
        load_weights(ctx.resume_from, model)
        load_optimizer(ctx.resume_from, optimizer)
        start_epoch, best = state["epoch"], state["best"]
        # The best epoch's weights travel inside the reported checkpoint (see below).
        shutil.rmtree(best_dir, ignore_errors=True)
        carried = ctx.resume_from / CARRIED
        shutil.copytree(carried if carried.is_dir() else ctx.resume_from, best_dir,
                        ignore=shutil.ignore_patterns(CARRIED))
        ctx.log(f"resuming after epoch {start_epoch} (best so far: epoch {best['epoch']})")
        ctx.tracker.set_tags({"segtune.resumed_from_epoch": str(start_epoch)})
    model, optimizer, train_dl, val_dl, test_dl = accelerator.prepare(model, optimizer, train_dl, val_dl, test_dl)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # checkpoint keys as the model names them

    metrics: dict[str, Any] = {}
    writer = CheckpointWriter(ckpt_dir)
    # Overlays are drawn and uploaded while training goes on; leaving this block waits for them.
    with OverlayLog(ctx.tracker, cfg.eval.overlays) as overlays:
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            train_collate.epoch = epoch
            loss = train_epoch(model, train_dl, optimizer, accelerator, loss_fn)
            writer.start(raw_model, optimizer)  # the weights and optimizer state are written while validating
            val, _ = score_loader(model, val_dl, accelerator=accelerator)
            metrics = {"train/dice_loss": loss, "val/dice": val["dice"], "val/iou": val["iou"], "epoch": epoch}
            if val["dice"] > best["dice"]:
                best = {"dice": val["dice"], "epoch": epoch}
            # A trial restored elsewhere (a retry, a resumed sweep) must still test its best epoch:
            # when that is an earlier one, the checkpoint carries it.
            writer.finish(cfg, {"epoch": epoch, "metrics": metrics, "best": best},
                          carry=best_dir if best["epoch"] != epoch else None)
            if best["epoch"] == epoch:
                link_copy(ckpt_dir, best_dir)
            ctx.log(f"epoch {epoch}/{cfg.train.epochs}: train/dice_loss={loss:.4f} "
                    f"val/dice={val['dice']:.4f} val/iou={val['iou']:.4f}")
            ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            ctx.tracker.flush()
            every = cfg.eval.overlay_every
            if every and epoch % every == 0 and epoch != cfg.train.epochs:
                overlays.log(raw_model, val_dl, f"overlays/epoch_{epoch:03d}")  # how the masks look as training goes
            if epoch == cfg.train.epochs:
                # Test before the last report: a scheduler may stop the trial at its final report.
                metrics.update(_finish(cfg, ctx, raw_model, best, best_dir, test_dl, accelerator, overlays))
            if ctx.report_epoch is not None:
                ctx.report_epoch(dict(metrics, **{"val/dice_best": best["dice"]}), ckpt_dir)
    return metrics


def _finish(cfg: ExperimentConfig, ctx: TrialContext, model: Segmenter, best: dict, best_dir: Path,
            test_dl: DataLoader, accelerator: Accelerator, overlays: OverlayLog) -> dict[str, float]:
    """Score the best epoch's checkpoint on the test split, log it, close the run.

    The test split is scored per image (`per_image/test.csv`, its histogram and the worst
    `eval.worst_k` samples' overlays: segtune.overlay_log), with the boundary metrics of
    `eval.metrics` beside IoU and Dice. The best checkpoint uploads while the test split is
    scored (on a GPU the two use different hardware); until it is done, only the overlay
    thread's uploads of earlier figures may run beside it, and nothing touches the tracker's
    spool or tags.
    """
    records: list[ImageScore] = []
    with ThreadPoolExecutor(1, thread_name_prefix="segtune-upload") as pool:
        upload = pool.submit(ctx.tracker.log_checkpoint, best_dir)
        if best["epoch"] != cfg.train.epochs:  # when the last epoch is the best, the model holds it already
            load_weights(best_dir, model)
        test, _ = score_loader(model, test_dl, accelerator=accelerator, metrics=cfg.eval.metrics, per_image=records)
    out = {"val/dice_best": best["dice"], "best_epoch": best["epoch"],
           **{f"test/{k}": v for k, v in test.items()}}
    extra = "".join(f" test/{m}={test[m]:.4f}" for m in cfg.eval.metrics)
    ctx.log(f"best epoch {best['epoch']}: val/dice={best['dice']:.4f}; test/iou={test['iou']:.4f} "
            f"test/dice={test['dice']:.4f}{extra}")
    upload.result()  # raises what the upload raised
    ctx.tracker.log_metrics({k: float(v) for k, v in out.items()}, step=cfg.train.epochs)
    ctx.tracker.flush()
    overlays.log(model, test_dl)  # the best checkpoint's masks on the first test samples
    # Where it fails: every test sample's scores, and its worst samples drawn.
    overlays.log_per_image(model, test_dl, records, store=ctx.store, split="test", worst_k=cfg.eval.worst_k)
    overlays.close()  # every figure is up (or its failure tagged) before the run ends
    ctx.tracker.finish("FINISHED")
    return out
