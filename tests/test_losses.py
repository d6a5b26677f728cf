"""Losses on mask logits: registry-wide sanity, and the thesis's Dice loss by known answers."""

from __future__ import annotations

import math

import pytest
import torch

from segtune.losses import LOSSES, dice_bce_loss, dice_loss

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def _target() -> torch.Tensor:
    """Two 8x8 masks: a square and a bar, shape (2,1,8,8)."""
    y = torch.zeros(2, 1, 8, 8)
    y[0, 0, 2:6, 2:6] = 1
    y[1, 0, 0:3, :] = 1
    return y


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_scalar_with_nonzero_gradient(name: str) -> None:
    y = _target()
    logits = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = LOSSES[name](logits, y)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_confident_correct_beats_confident_wrong(name: str) -> None:
    y = _target()
    right = torch.where(y > 0, 8.0, -8.0)
    wrong = -right
    unsure = torch.zeros_like(y)
    fn = LOSSES[name]
    assert fn(right, y) < fn(unsure, y) < fn(wrong, y)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_logits_give_the_float32_loss(name: str) -> None:
    # Under mixed precision the logits arrive as bf16; the loss is computed in float32.
    y = _target()
    logits = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = LOSSES[name](logits, y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(LOSSES[name](logits.float(), y).item(), abs=1e-6)


def test_dice_loss_known_answer_one_image() -> None:
    # p = [[0.5, 0.75], [0.25, 0.5]], y = [[1, 1], [0, 0]]:
    # sum(y*p) = 1.25, sum(y) = 2, sum(p) = 2.0 -> 1 - (2.5 + 1) / (2 + 2 + 1) = 0.3
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]])
    y = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert dice_loss(logits, y).item() == pytest.approx(0.3, abs=1e-6)


def test_dice_loss_is_per_image_then_averaged() -> None:
    # Image 1 as above (0.3); image 2: p = 0.5 everywhere, y empty ->
    # 1 - (0 + 1) / (0 + 2 + 1) = 2/3. Mean 0.48333...; pooling the batch would give 0.5.
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    y = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert dice_loss(logits, y).item() == pytest.approx((0.3 + 2 / 3) / 2, abs=1e-6)


def test_dice_loss_smooth_term_known_answer() -> None:
    # Same single image, smooth = 0: 1 - 2.5 / 4 = 0.375.
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]]])
    y = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert dice_loss(logits, y, smooth=0.0).item() == pytest.approx(0.375, abs=1e-6)


def test_dice_bce_loss_known_answer() -> None:
    # BCE over the 8 pixels of the two images above: six pixels at p = 0.5 (ln 2 each) and two
    # correct pixels at 0.75 / 0.25 (ln 4/3 each).
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    y = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    bce = (6 * math.log(2) + 2 * math.log(4 / 3)) / 8
    assert dice_bce_loss(logits, y).item() == pytest.approx((0.3 + 2 / 3) / 2 + bce, abs=1e-6)


def test_dice_loss_near_zero_for_large_correct_logits() -> None:
    y = _target()
    assert dice_loss(torch.where(y > 0, 30.0, -30.0), y).item() < 1e-4


def test_dice_loss_near_one_for_large_wrong_logits() -> None:
    # Every pixel wrong: 1 - 1 / (|Y| + |~Y| + 1) = 1 - 1/65 for an 8x8 image.
    y = _target()
    assert dice_loss(torch.where(y > 0, -30.0, 30.0), y).item() == pytest.approx(1 - 1 / 65, abs=1e-4)


def test_dice_loss_empty_target_with_very_negative_logits_is_near_zero() -> None:
    y = torch.zeros(2, 1, 8, 8)
    assert dice_loss(torch.full_like(y, -30.0), y).item() < 1e-4
    # ...but predicting foreground on an empty mask is penalised.
    assert dice_loss(torch.full_like(y, 30.0), y).item() > 0.9
