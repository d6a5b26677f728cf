"""Per-image Dice and IoU of binary masks: pure tensor functions with documented edge cases.

Both take boolean (or 0/1) tensors `(B,1,H,W)` or `(B,H,W)` and return one score per image.
An empty prediction on an empty ground truth scores 1.0 (the model was right that nothing is
there); an empty prediction on a non-empty mask, or the reverse, scores 0.0. Test IoU is the
mean of per-image IoU, as in the thesis.
"""

from __future__ import annotations

import torch


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
