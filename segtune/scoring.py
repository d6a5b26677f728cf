"""The loop's forward pass and the one scorer every split, epoch, evaluation and overlay uses.

`forward_batch` is a batch through the model (from cached encoder rows when the batch carries
them); `score_loader` is mean per-image Dice and IoU of the thresholded masks over a loader,
across every worker of a data-parallel trial when given its Accelerator, and keeps the first
few samples as `Example`s for overlay figures. Asked, it also scores the boundary metrics of
`eval.metrics` and hands back every sample's scores as `ImageScore`s (the per-image table of
a trial's test split and of an evaluation, segtune.overlay_log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segtune.cache import decode_cached
from segtune.metrics import BOUNDARY_METRICS, dice, iou, masks_from_logits
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


@dataclass
class ImageScore:
    """One scored sample: its index in the store (index.json's `samples`) and its scores —
    `iou`, `dice`, `foreground` (the truth's foreground fraction), `predicted` (the
    prediction's), and any boundary metric asked for."""

    index: int
    scores: dict[str, float]


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
                 keep: int = 0, label: str | None = None, line: Callable[[str], None] | None = None,
                 metrics: Sequence[str] = (),
                 per_image: list[ImageScore] | None = None) -> tuple[dict[str, float], list[Example]]:
    """Mean per-image Dice and IoU of the model's thresholded masks over `loader`, and its
    first `keep` samples as overlay examples.

    With `accelerator` (a trial's), batches run under its autocast and the scores of every
    worker are gathered; without, on the device the model's weights are on, in full precision.
    With `label` (a standalone evaluation, not a trial's epoch), progress is shown under that
    label; plain progress lines go to `line`. `metrics` names boundary metrics to score too
    (segtune.metrics.BOUNDARY_METRICS: a distance transform per image on the CPU), averaged
    into the result under their names. With a `per_image` list, one `ImageScore` per sample
    (of every worker) is appended to it; batches must then carry `index` (PromptCollate's).
    """
    if label is None:
        return _score(model, loader, accelerator, keep, None, metrics, per_image)
    total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[arg-type]
    with progress(label, total, unit="images", line=line) as bar:
        return _score(model, loader, accelerator, keep, bar.advance, metrics, per_image)


@torch.no_grad()
def _score(model: nn.Module, loader: Iterable[dict[str, Any]], accelerator: Accelerator | None, keep: int,
           advance: Callable[[int], None] | None, metrics: Sequence[str] = (),
           per_image: list[ImageScore] | None = None) -> tuple[dict[str, float], list[Example]]:
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    unknown = [m for m in metrics if m not in BOUNDARY_METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; expected one of {', '.join(BOUNDARY_METRICS)}")
    # One column per score; a sample's row travels through the gather whole.
    names = ["dice", "iou"] + (["foreground", "predicted"] if per_image is not None else []) + list(metrics)
    columns: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    examples: list[Example] = []
    for batch in loader:
        with autocast():
            logits = forward_batch(model, batch, device)
        pred, target = masks_from_logits(logits.float()), batch["mask"].to(device) > 0.5
        row = [dice(pred, target), iou(pred, target)]
        if per_image is not None:
            if "index" not in batch:
                raise ValueError("per-image scores need each batch's sample `index` "
                                 "(segtune.loaders.PromptCollate adds it)")
            row += [target.flatten(1).float().mean(1), pred.flatten(1).float().mean(1)]
        row += [BOUNDARY_METRICS[m](pred, target) for m in metrics]
        scores = torch.stack(row, dim=1)
        index = batch["index"].to(device) if per_image is not None else None
        # This worker's own IoUs, for the overlays' captions; copied only while examples are kept.
        local_iou = scores[:, 1].cpu() if len(examples) < keep else None
        if accelerator is not None:
            # Per-image scores (and sample indices) from every worker; gather_for_metrics drops
            # the padding Accelerate adds to even out the last batch across workers.
            if index is None:
                scores = accelerator.gather_for_metrics(scores)
            else:
                scores, index = accelerator.gather_for_metrics((scores, index))
        columns.append(scores.cpu())
        if index is not None:
            indices.append(index.cpu())
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
    table = torch.cat(columns)
    if per_image is not None:
        for sample, row in zip(torch.cat(indices).tolist(), table.tolist(), strict=True):
            per_image.append(ImageScore(int(sample), dict(zip(names, row, strict=True))))
    means = table.mean(0).tolist()
    return {name: means[i] for i, name in enumerate(names) if name not in ("foreground", "predicted")}, examples


def first_batches(loader: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The loader's first batches, enough for `count` samples (the overlays' samples)."""
    out, n = [], 0
    for batch in loader:
        out.append(batch)
        n += len(batch["image"])
        if n >= count:
            break
    return out
