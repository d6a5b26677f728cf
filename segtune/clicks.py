"""Corrective clicks: how much a model improves when a user clicks where it went wrong.

The protocol of interactive segmentation benchmarks (micro-sam's iterative evaluation, RITM's
NoC): start from one positive point at the object's centre (`prompts.center_point`), then
repeat: predict, find the error regions (missed foreground, false foreground), put one click at
the centre of the largest of them (the pixel farthest from its boundary, the image border
counting as boundary), positive (label 1) in a missed region and negative (label 0) in a false
one, and predict again with every click so far. Unlike micro-sam's training-time generator,
which samples a random pixel of each error region and adds a positive and a negative point per
step, each step here adds the one click a careful user would, so the score is deterministic.

An image predicted without error gets no more clicks: its later clicks are SAM's padding
(label -1, "not a point") and its prediction is kept as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from segtune.metrics import iou, masks_from_logits
from segtune.prompts import PromptBatch, PromptOptions, center_point

#: The extra clicks after which IoU is reported (`robust/clicks_<n>/iou`); 0 is the start point.
CLICKS = (0, 1, 3, 5)
PAD = -1  # SAM's label for "not a point": its prompt encoder embeds it as padding


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    label: int  # 1: the model missed foreground here; 0: it marked background as foreground
    area: int  # pixels of the error region it corrects


def _largest(region: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest connected component of `region` (8-connected) and its size (0: none)."""
    labels, n = ndimage.label(region, structure=np.ones((3, 3), bool))
    if n == 0:
        return region, 0
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes))  # equal sizes: the first in raster order
    return labels == biggest + 1, int(sizes[biggest])


def next_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """The corrective click for one image: at the centre of the largest error region, positive
    in missed foreground, negative in false foreground (equal sizes: positive). None when the
    prediction has no error."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    missed, missed_area = _largest(gt & ~pred)
    false, false_area = _largest(pred & ~gt)
    if missed_area == 0 and false_area == 0:
        return None
    region, label, area = (missed, 1, missed_area) if missed_area >= false_area else (false, 0, false_area)
    (x, y), = center_point(region.astype(np.uint8), np.random.default_rng(0), PromptOptions()).points
    return Click(int(x), int(y), label, area)


def start_points(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first prompt of each `(H,W)` mask of a batch: one positive point at its centre."""
    points = [center_point(m, np.random.default_rng(0), PromptOptions()).points for m in masks]
    return np.stack(points).astype(np.float32), np.ones((len(masks), 1), np.int64)


@torch.no_grad()
def click_scores(model: nn.Module, loader: Iterable[dict[str, Any]], counts: Sequence[int] = CLICKS,
                 advance: Any = None) -> dict[int, float]:
    """Mean per-image IoU after each number of corrective clicks in `counts`, over `loader`'s
    batches (their own prompts are not used: each image starts from its centre point).

    The image encoder runs once per batch where the model has one (`encode`); each click
    decodes again with every point so far. A model without (an ensemble averaging its
    members' logits) runs whole at every step.
    """
    model.eval()
    device = next(model.parameters()).device
    last = max(counts)
    scores: dict[int, list[torch.Tensor]] = {n: [] for n in counts}
    for batch in loader:
        images = batch["image"].to(device)
        gt = batch["mask"][:, 0].numpy() > 0.5
        embeddings = model.encode(images) if hasattr(model, "encode") else None
        points, labels = start_points(gt.astype(np.uint8))
        pred = _predict(model, images, embeddings, points, labels)
        for n in range(last + 1):
            if n > 0:
                clicks = [next_click(g, p) for g, p in zip(gt, pred, strict=True)]
                points, labels = add_clicks(points, labels, clicks)
                fresh = _predict(model, images, embeddings, points, labels)
                done = np.array([c is None for c in clicks])
                pred = np.where(done[:, None, None], pred, fresh)  # a perfect mask is kept
            if n in scores:
                target = torch.from_numpy(gt)[:, None]
                scores[n].append(iou(torch.from_numpy(pred)[:, None], target).cpu())
        if advance is not None:
            advance(len(gt))
    return {n: torch.cat(v).mean().item() for n, v in scores.items()}


def add_clicks(points: np.ndarray, labels: np.ndarray, clicks: Sequence[Click | None]) -> tuple[np.ndarray, np.ndarray]:
    """Append one click per image to `(B,N,2)` points and `(B,N)` labels (padding for None)."""
    new = np.array([[c.x, c.y] if c else [0, 0] for c in clicks], np.float32)[:, None]
    lab = np.array([c.label if c else PAD for c in clicks], np.int64)[:, None]
    return np.concatenate([points, new], axis=1), np.concatenate([labels, lab], axis=1)


def _predict(model: nn.Module, images: torch.Tensor, embeddings: torch.Tensor | None, points: np.ndarray,
             labels: np.ndarray) -> np.ndarray:
    prompts = PromptBatch(points=torch.from_numpy(points), labels=torch.from_numpy(labels)).to(images.device)
    logits = model(images, prompts) if embeddings is None else model(images, prompts, embeddings=embeddings)
    return masks_from_logits(logits.float())[:, 0].cpu().numpy()
