"""The loop's forward pass and the one scorer every split, epoch, evaluation and overlay uses.

`forward_batch` is a batch through the model (from cached encoder rows when the batch carries
them); `score_loader` is mean per-image Dice and IoU of the thresholded masks over a loader,
across every worker of a data-parallel trial when given its Accelerator, and keeps the first
few samples as `Example`s for overlay figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segtune.cache import decode_cached
from segtune.metrics import dice, iou, masks_from_logits
from segtune.progress import progress

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Example:
    """One scored sample kept for an overlay."""

    image: np.ndarray  # (H,W,C) uint8
    gt: np.ndarray  # (H,W) bool
    pred: np.ndarray  # (H,W) bool
    caption: str
    points: np.ndarray | None = None
    box: np.ndarray | None = None
    text: str | None = None


def forward_batch(model: nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Mask logits for a batch: decoded from its cached embeddings if it has them."""
    prompts = batch["prompts"].to(device)
    images = batch["image"].to(device)
    if "embedding" not in batch:
        return model(images, prompts)
    return decode_cached(model, batch["embedding"].to(device), images, prompts)


def hwc(image: torch.Tensor) -> np.ndarray:
    """A `(C,H,W)` image tensor as the `(H,W,C)` uint8 array figures draw."""
    return image.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0)


def score_loader(model: nn.Module, loader: Iterable[dict[str, Any]], *, accelerator: Accelerator | None = None,
                 keep: int = 0, label: str | None = None,
                 line: Callable[[str], None] | None = None) -> tuple[dict[str, float], list[Example]]:
    """Mean per-image Dice and IoU of the model's thresholded masks over `loader`, and its
    first `keep` samples as overlay examples.

    With `accelerator` (a trial's), batches run under its autocast and the scores of every
    worker are gathered; without, on the device the model's weights are on, in full precision.
    With `label` (a standalone evaluation, not a trial's epoch), progress is shown under that
    label; plain progress lines go to `line`.
    """
    if label is None:
        return _score(model, loader, accelerator, keep, None)
    total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[arg-type]
    with progress(label, total, unit="images", line=line) as bar:
        return _score(model, loader, accelerator, keep, bar.advance)


@torch.no_grad()
def _score(model: nn.Module, loader: Iterable[dict[str, Any]], accelerator: Accelerator | None, keep: int,
           advance: Callable[[int], None] | None) -> tuple[dict[str, float], list[Example]]:
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    dices, ious, examples = [], [], []
    for batch in loader:
        with autocast():
            logits = forward_batch(model, batch, device)
        pred, target = masks_from_logits(logits.float()), batch["mask"].to(device) > 0.5
        scores = torch.stack([dice(pred, target), iou(pred, target)], dim=1)
        # This worker's own IoUs, for the overlays' captions; copied only while examples are kept.
        local_iou = scores[:, 1].cpu() if len(examples) < keep else None
        if accelerator is not None:
            # Per-image scores from every worker; gather_for_metrics drops the padding Accelerate
            # adds to even out the last batch across workers.
            scores = accelerator.gather_for_metrics(scores)
        dices.append(scores[:, 0].cpu())
        ious.append(scores[:, 1].cpu())
        pr = batch["prompts"]
        for i in range(min(keep - len(examples), len(pred))):
            examples.append(Example(
                hwc(batch["image"][i]), target[i, 0].cpu().numpy(), pred[i, 0].cpu().numpy(),
                caption=f"IoU {local_iou[i]:.2f}",
                points=None if pr.points is None else pr.points[i].cpu().numpy(),
                box=None if pr.boxes is None else pr.boxes[i].cpu().numpy(),
                text=None if pr.texts is None else pr.texts[i]))
        if advance is not None:
            advance(len(pred))
    return {"dice": torch.cat(dices).mean().item(), "iou": torch.cat(ious).mean().item()}, examples


def first_batches(loader: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The loader's first batches, enough for `count` samples (the overlays' samples)."""
    out, n = [], 0
    for batch in loader:
        out.append(batch)
        n += len(batch["image"])
        if n >= count:
            break
    return out
