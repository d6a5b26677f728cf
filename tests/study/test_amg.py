"""The AMG protocols on hand-made masks with known answers, and the generator on a tiny SAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.amg import amg_scores, best_single, build_generator, generate, hwc_rgb, union_inside
from segtune.config import AmgConfig, ModelConfig
from segtune.errors import ConfigError
from segtune.models import build_model


def box(r0: int, r1: int, c0: int, c1: int, shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# Ground truth: a 10x10 square (100 px). A and B lie wholly inside it (50 and 25 px); C is half
# inside (25 of 50 px); D lies outside.
GT = box(0, 10, 0, 10)
A, B, C, D = box(0, 5, 0, 10), box(5, 10, 0, 5), box(5, 10, 5, 15), box(15, 20, 15, 20)


def test_union_of_masks_mostly_inside_the_truth() -> None:
    union, kept = union_inside([A, B, C, D], GT, inside=0.6)
    assert kept == 2 and union.sum() == 75  # A and B; C (0.5 inside) and D are left out
    metrics, _ = amg_scores([A, B, C, D], GT, inside=0.6)
    assert metrics["iou"] == pytest.approx(75 / 100)
    assert metrics["dice"] == pytest.approx(2 * 75 / (75 + 100))
    assert (metrics["masks"], metrics["masks_inside"]) == (4, 2)


def test_threshold_is_inclusive_and_lets_half_inside_masks_in() -> None:
    metrics, union = amg_scores([A, B, C, D], GT, inside=0.5)
    # A + B + C: 125 px, 100 of them inside, and the whole truth covered: IoU 100 / 125.
    assert union.sum() == 125
    assert metrics["iou"] == pytest.approx(0.8)
    assert metrics["masks_inside"] == 3


def test_best_single_mask() -> None:
    assert (best_single([A, B, C, D], GT) == A).all()
    metrics, _ = amg_scores([A, B, C, D], GT, inside=0.6)
    assert metrics["iou_best_mask"] == pytest.approx(0.5)
    assert metrics["dice_best_mask"] == pytest.approx(2 * 50 / 150)


@pytest.mark.parametrize("masks, gt, iou, best", [
    ([], GT, 0.0, 0.0),                          # SAM found nothing: both protocols score 0
    ([], np.zeros_like(GT), 1.0, 1.0),           # nothing found where nothing is: 1, as metrics.iou
    ([D], np.zeros_like(GT), 1.0, 1.0),          # a mask outside an empty truth is not chosen
    ([box(0, 10, 0, 10)], GT, 1.0, 1.0),         # one perfect mask
])
def test_edge_cases(masks, gt, iou, best) -> None:
    metrics, _ = amg_scores(masks, gt, inside=0.5)
    assert metrics["iou"] == pytest.approx(iou) and metrics["iou_best_mask"] == pytest.approx(best)


def test_generator_on_a_tiny_sam_returns_image_sized_masks() -> None:
    model = build_model(ModelConfig(name="sam", variant="tiny")).eval()
    gen = build_generator(model, AmgConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0))
    image = torch.randint(0, 256, (1, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert hwc_rgb(image).shape == (64, 96, 3)  # grey stores become the RGB the generator wants
    masks = generate(gen, image)
    assert masks and all(m.shape == (64, 96) and m.dtype == bool for m in masks)


@pytest.mark.parametrize("family", ["medsam", "pasam", "clipseg"])
def test_amg_is_refused_for_models_it_would_bypass(family: str) -> None:
    model = build_model(ModelConfig(name=family, variant="tiny", train="decoder" if family == "clipseg" else "full"))
    with pytest.raises(ConfigError, match="needs model.name sam"):
        build_generator(model, AmgConfig())
