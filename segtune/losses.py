"""Training losses on mask logits: pure tensor functions, registered in LOSSES by YAML name."""

from __future__ import annotations

from collections.abc import Callable

import torch


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """The thesis's Dice loss, `1 - (2*sum(y*p) + s) / (sum(y) + sum(p) + s)`, per image, averaged.

    `logits` and `target` are `(B,1,H,W)`; `p = sigmoid(logits)`, `y` in {0,1}. The smoothing
    term makes an empty prediction on an empty mask a loss of 0 rather than 0/0.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    y = target.float().flatten(1)
    inter = (p * y).sum(1)
    score = (2 * inter + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return (1 - score).mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice loss plus binary cross-entropy, a common choice when masks are small."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
    return dice_loss(logits, target) + bce


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dice": dice_loss,
    "dice_bce": dice_bce_loss,
}
