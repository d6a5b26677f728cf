"""One trial: the Accelerate training loop for one model/dataset pair, with no Ray inside.

`run_trial(cfg, ctx)` reads top to bottom like Accelerate's `cv_example.py`: build the model,
optimizer and loaders, let the Accelerator prepare them, then per epoch train, validate,
checkpoint, log and report. After the last epoch it scores the test split with the best
epoch's checkpoint. Ray Tune (sweep.py) and `segtune train` both call it; what differs is in
`TrialContext`: where to log, where to report, where to write.
"""

from __future__ import annotations

import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader

from segtune.cache import EmbeddingCache, for_trial, forward_batch
from segtune.checkpoint import CARRIED, CheckpointWriter, link_copy, load_optimizer, load_weights, read_state
from segtune.config import ExperimentConfig
from segtune.data import SegDataset, open_store
from segtune.errors import ConfigError, TrainingError
from segtune.losses import LOSSES
from segtune.metrics import dice, iou, masks_from_logits
from segtune.models import Segmenter, build_model
from segtune.overlay_log import OverlayLog
from segtune.prompts import PROMPTS, PromptOptions, needs_foreground, stack


class Tracker(Protocol):
    """What the loop needs from a tracking run (tracking.runs.TrialRun implements it)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def flush(self) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


@dataclass
class TrialContext:
    """Where a trial logs, reports and writes; the machine side of a trial, apart from its config."""

    store: Path
    workdir: Path
    tracker: Tracker | None = None
    # Called once per epoch with the epoch's metrics and checkpoint dir (Tune's report).
    report: Callable[[dict[str, Any], Path], None] | None = None
    # A checkpoint to continue from (Tune's restored checkpoint after a failure).
    resume_from: Path | None = None
    log: Callable[[str], None] = print


class PromptCollate:
    """Batches samples and draws each one's prompt from its mask.

    The generator is seeded by (seed, epoch, sample index): training prompts change every
    epoch, evaluation prompts (epoch fixed at 0) are the same in every trial and every run.
    """

    def __init__(self, strategy: str, seed: int, opts: PromptOptions):
        if strategy not in PROMPTS:
            raise ConfigError(f"prompt: unknown prompt strategy {strategy!r}; expected one of {', '.join(PROMPTS)}")
        self.build, self.seed, self.opts, self.epoch = PROMPTS[strategy], seed, opts, 0

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        prompts = []
        for it in items:
            opts = self.opts if self.opts.text else replace(self.opts, text=it.get("text") or None)
            rng = np.random.default_rng([self.seed, self.epoch, it["index"]])
            prompts.append(self.build(it["mask"][0].numpy(), rng, opts))
        batch = {"image": torch.stack([it["image"] for it in items]),
                 "mask": torch.stack([it["mask"] for it in items]),
                 "prompts": stack(prompts),
                 "text": [it["text"] for it in items]}
        if "embedding" in items[0]:  # an embedding-cache split (segtune.cache)
            batch["embedding"] = torch.stack([it["embedding"] for it in items])
        return batch


def _with_foreground(ds: SegDataset) -> SegDataset:
    """The samples whose mask has foreground (point and box prompts need some)."""
    masks = np.load(Path(ds.path) / "masks.npy", mmap_mode="r")
    keep = [i for i in ds.indices if masks[i].any()]
    return SegDataset(ds.path, keep, ds.split) if len(keep) < len(ds.indices) else ds


def _optimizer(cfg: ExperimentConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    # One fused kernel per step instead of a loop over tensors, where PyTorch has it (CUDA).
    fused = {"fused": True} if torch.cuda.is_available() else {}
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)


def make_loaders(cfg: ExperimentConfig, store: Path, log: Callable[[str], None] = print,
                 cache: EmbeddingCache | None = None) -> tuple[DataLoader, DataLoader, DataLoader, PromptCollate]:
    """Train, validation and test loaders over the prepared store, with prompts drawn per sample.

    With `cache`, every batch also carries its images' cached encoder output (`embedding`).
    """
    data = open_store(store)
    splits = {s: data.split(s) for s in ("train", "val", "test")}
    caps = {"train": cfg.dataset.max_train, "val": cfg.dataset.max_eval, "test": cfg.dataset.max_eval}
    for s, cap in caps.items():
        strategy = cfg.prompt.train if s == "train" else cfg.prompt.eval
        if needs_foreground(strategy):
            before = len(splits[s])
            splits[s] = _with_foreground(splits[s])
            if len(splits[s]) < before:
                log(f"{s}: {before - len(splits[s])} of {before} samples have an empty mask and no "
                    f"{strategy} prompt; left out")
        if cap is not None and len(splits[s]) > cap:
            splits[s] = splits[s].subset(cap)
        if len(splits[s]) == 0:
            raise ConfigError(f"dataset: the {s} split of {store} is empty; lower dataset.val_fraction "
                              "or check the data")
    if cache is not None:
        splits = {s: cache.wrap(ds) for s, ds in splits.items()}
    p = cfg.prompt
    opts = PromptOptions(train=False, text=p.text, k=p.k, box_jitter=p.box_jitter)
    train_collate = PromptCollate(p.train, cfg.train.seed, replace(opts, train=True))
    eval_collate = PromptCollate(p.eval, cfg.train.seed, opts)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    io = loader_options(cfg)
    train = DataLoader(splits["train"], batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
                       collate_fn=train_collate, drop_last=len(splits["train"]) > cfg.train.batch_size, **io)
    val = DataLoader(splits["val"], batch_size=cfg.train.batch_size, collate_fn=eval_collate, **io)
    test = DataLoader(splits["test"], batch_size=cfg.train.batch_size, collate_fn=eval_collate, **io)
    return train, val, test, train_collate


def loader_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """DataLoader workers and pinning from the trial's resources.

    The store is memory-mapped and nothing is decoded, so a batch costs little more than a
    copy and drawing prompts: one CPU of a trial's share stays with the loop, the others (up
    to 4) load batches; `resources.loader_workers` overrides. Workers are not persistent: the
    collate function's epoch (which seeds training prompts) reaches them as each epoch starts.
    Pinned memory only when there is a GPU to copy to.
    """
    workers = cfg.resources.loader_workers
    if workers is None:
        workers = max(0, min(4, int(cfg.resources.per_worker()["CPU"]) - 1))
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available()}


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


@torch.no_grad()
def evaluate(model: Segmenter, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """Mean per-image Dice and IoU of thresholded predictions over a loader."""
    model.eval()
    dices, ious = [], []
    for batch in loader:
        with accelerator.autocast():
            logits = forward_batch(model, batch, accelerator.device)
        pred = masks_from_logits(logits.float())
        target = batch["mask"] > 0.5
        # Per-image scores from every worker; gather_for_metrics drops the padding Accelerate
        # adds to even out the last batch across workers.
        scores = accelerator.gather_for_metrics(torch.stack([dice(pred, target), iou(pred, target)], dim=1))
        dices.append(scores[:, 0].cpu())
        ious.append(scores[:, 1].cpu())
    return {"dice": torch.cat(dices).mean().item(), "iou": torch.cat(ious).mean().item()}


def _accelerator(cfg: ExperimentConfig) -> Accelerator:
    """This trial's Accelerator, with its own precision and compile settings.

    Accelerate keeps them in process-wide state that the first Accelerator fixes; a Tune worker
    runs trial after trial (actor reuse), so that state is cleared first. The process group
    (PartialState, set up by Ray Train for a data-parallel trial) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
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
    model = build_model(cfg.model)
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
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
        if ctx.tracker is not None:
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
            val = evaluate(model, val_dl, accelerator)
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
            if ctx.tracker is not None:
                ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                ctx.tracker.flush()
                every = cfg.eval.overlay_every
                if every and epoch % every == 0 and epoch != cfg.train.epochs:
                    overlays.log(raw_model, val_dl, f"overlays/epoch_{epoch:03d}")  # how the masks look as training goes
            if epoch == cfg.train.epochs:
                # Test before the last report: a scheduler may stop the trial at its final report.
                metrics.update(_finish(cfg, ctx, raw_model, best, best_dir, test_dl, accelerator, overlays))
            if ctx.report is not None:
                ctx.report(dict(metrics, **{"val/dice_best": best["dice"]}), ckpt_dir)
    return metrics


def _finish(cfg: ExperimentConfig, ctx: TrialContext, model: Segmenter, best: dict, best_dir: Path,
            test_dl: DataLoader, accelerator: Accelerator, overlays: OverlayLog) -> dict[str, float]:
    """Score the best epoch's checkpoint on the test split, log it, close the run.

    The best checkpoint uploads while the test split is scored (on a GPU the two use different
    hardware); until it is done, only the overlay thread's uploads of earlier figures may run
    beside it (segtune.overlay_log), and nothing touches the tracker's spool or tags.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="segtune-upload") as pool:
        upload = pool.submit(ctx.tracker.log_checkpoint, best_dir) if ctx.tracker is not None else None
        if best["epoch"] != cfg.train.epochs:  # when the last epoch is the best, the model holds it already
            load_weights(best_dir, model)
        test = evaluate(model, test_dl, accelerator)
    out = {"val/dice_best": best["dice"], "best_epoch": best["epoch"],
           "test/dice": test["dice"], "test/iou": test["iou"]}
    ctx.log(f"best epoch {best['epoch']}: val/dice={best['dice']:.4f}; test/iou={test['iou']:.4f} "
            f"test/dice={test['dice']:.4f}")
    if ctx.tracker is not None:
        upload.result()  # raises what the upload raised
        ctx.tracker.log_metrics({k: float(v) for k, v in out.items()}, step=cfg.train.epochs)
        ctx.tracker.flush()
        overlays.log(model, test_dl)  # the best checkpoint's masks on the first test samples
        overlays.close()  # every figure is up (or its failure tagged) before the run ends
        ctx.tracker.finish("FINISHED")
    return out
