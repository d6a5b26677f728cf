"""Per-image Dice and IoU of binary masks: pure tensor functions with documented edge cases.

Both take boolean (or 0/1) tensors `(B,1,H,W)` or `(B,H,W)` and return one score per image.
An empty prediction on an empty ground truth scores 1.0 (the model was right that nothing is
there); an empty prediction on a non-empty mask, or the reverse, scores 0.0. Test IoU is the
mean of per-image IoU, as in the thesis.

The boundary metrics `hd95` and `boundary_f1` (`eval.metrics`) compare the masks' outlines
with scipy's distance transform, on the CPU; their definitions and empty-mask cases are in
their docstrings and docs/study.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage


def _flat(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return pred.bool().flatten(1), target.bool().flatten(1)


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image; 1.0 where both masks are empty."""
    p, y = _flat(pred, target)
    inter = (p & y).sum(1).float()
    union = (p | y).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice coefficient `2|P∩Y| / (|P|+|Y|)` per image; 1.0 where both masks are empty."""
    p, y = _flat(pred, target)
    inter = (p & y).sum(1).float()
    total = (p.sum(1) + y.sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def masks_from_logits(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Binary masks from logits (threshold 0 on logits is probability 0.5)."""
    return logits > threshold


# Boundary metrics (`eval.metrics: [hd95, boundary_f1]`), from scipy's exact Euclidean distance
# transform, in pixels. A mask's boundary is its pixels with a 4-neighbour outside it
# (`m & ~binary_erosion(m)`, scipy's default cross; pixels on the image's edge count, as in MONAI's
# get_mask_edges), so a one-pixel object is its own boundary.

BOUNDARY_TOLERANCE = 2.0  # pixels: boundary F1's match distance


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one image's `(H,W)` masks: the distance from each boundary pixel of `pred` to the
    nearest boundary pixel of `target`, and from each of `target`'s to `pred`'s (pixels,
    Euclidean). Both masks must have foreground."""
    bp, bt = _boundary(np.asarray(pred, bool)), _boundary(np.asarray(target, bool))
    if not bp.any() or not bt.any():
        raise ValueError("surface distances need foreground in both masks")
    return ndimage.distance_transform_edt(~bt)[bp], ndimage.distance_transform_edt(~bp)[bt]


def _per_image(fn: Callable[[np.ndarray, np.ndarray], float], pred: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    p = pred.detach().bool().cpu().numpy().reshape(len(pred), *pred.shape[-2:])
    y = target.detach().bool().cpu().numpy().reshape(len(target), *target.shape[-2:])
    return torch.tensor([fn(a, b) for a, b in zip(p, y, strict=True)], dtype=torch.float32, device=pred.device)


def _hd95(pred: np.ndarray, target: np.ndarray) -> float:
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(np.hypot(*pred.shape))
    to_target, to_pred = surface_distances(pred, target)
    return float(np.percentile(np.concatenate([to_target, to_pred]), 95))


def hd95(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """95th percentile Hausdorff distance per image, in pixels (lower is better).

    The 95th percentile (numpy's linear interpolation) of the symmetric surface distances:
    both directions' distances (`surface_distances`) pooled into one set, as medpy's `hd95`
    does (MONAI's `percentile=95` takes the larger of the two directions' percentiles instead).
    Where both masks are empty it is 0 (nothing to miss, as IoU's 1.0); where exactly one is
    empty, no boundary answers the other's, so it is the image's diagonal `sqrt(H²+W²)`, the
    largest distance the image holds: finite, so a split's mean stays a number, and never
    better than any prediction that found something.
    """
    return _per_image(_hd95, pred, target)


def _boundary_f1(pred: np.ndarray, target: np.ndarray, tolerance: float) -> float:
    if not pred.any() and not target.any():
        return 1.0
    if not pred.any() or not target.any():
        return 0.0
    to_target, to_pred = surface_distances(pred, target)
    precision, recall = float((to_target <= tolerance).mean()), float((to_pred <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def boundary_f1(pred: torch.Tensor, target: torch.Tensor, tolerance: float = BOUNDARY_TOLERANCE) -> torch.Tensor:
    """Boundary F1 (the BF score of Csurka et al., 2013) per image, in [0, 1] (higher is better).

    Precision is the fraction of the prediction's boundary pixels within `tolerance` pixels
    (Euclidean, inclusive) of the truth's boundary, recall the fraction of the truth's within
    `tolerance` of the prediction's; the score is their harmonic mean. The tolerance is a fixed
    2 px, not DAVIS's 0.008 of the image diagonal (about 2.9 px on a 256x256 patch), so that a
    score means the same at every patch size. Both masks empty: 1.0 (as IoU); exactly one
    empty: 0.0.
    """
    return _per_image(lambda p, y: _boundary_f1(p, y, tolerance), pred, target)


#: The optional per-image metrics `eval.metrics` names, computed beside Dice and IoU.
BOUNDARY_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hd95": hd95, "boundary_f1": boundary_f1}
