"""Boundary metrics (`eval.metrics: [hd95, boundary_f1]`): hand-computed answers, the documented
empty-mask cases, and the Hausdorff distance cross-checked against scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segtune.config import EvalConfig
from segtune.metrics import BOUNDARY_METRICS, boundary_f1, hd95, surface_distances


def _masks(h: int, w: int, *squares: tuple[slice, slice]) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    for rows, cols in squares:
        m[rows, cols] = True
    return m


# Two 10x10 squares, the second 3 px to the right of the first, in a 32x32 image.
A = _masks(32, 32, (slice(10, 20), slice(5, 15)))
B = _masks(32, 32, (slice(10, 20), slice(8, 18)))


def test_offset_squares_by_hand() -> None:
    # Each outline is 36 pixels. From A's to B's: the 7 shared pixels of the top edge and the 7
    # of the bottom edge are 0 away; the 3 top (and 3 bottom) pixels left of B are 3, 2, 1 away;
    # the 8 inner pixels of A's left edge are 3 away from B's left edge; the 8 of A's right
    # edge, inside B, are 1, 2, 3, 3, 3, 3, 2, 1 away (B's top or bottom edge, or its right edge
    # 3 px off). By symmetry B's to A's are the same 36 distances.
    to_b, to_a = surface_distances(A.numpy(), B.numpy())
    expected = sorted([0] * 14 + [3, 2, 1] * 2 + [3] * 8 + [1, 2, 3, 3, 3, 3, 2, 1])
    assert sorted(to_b.tolist()) == expected and sorted(to_a.tolist()) == expected
    # Pooled, 72 distances: 28 zeros, 8 ones, 8 twos, 28 threes: the 95th percentile is 3.
    assert hd95(A[None, None], B[None, None]).tolist() == [3.0]
    # Within 2 px: 14 + 4 + 4 = 22 of 36 each way, so precision = recall = F1 = 22/36.
    assert boundary_f1(A[None, None], B[None, None]).item() == pytest.approx(22 / 36)


def test_hd95_ignores_a_stray_pixel_that_the_hausdorff_distance_does_not() -> None:
    target = _masks(64, 64, (slice(10, 20), slice(10, 20)))
    pred = _masks(64, 64, (slice(10, 20), slice(10, 20)), (slice(19, 20), slice(40, 41)))
    to_target, to_pred = surface_distances(pred.numpy(), target.numpy())
    # The stray pixel (19, 40) is 21 px from the square's right edge (column 19); every other
    # distance is 0: 73 pooled distances, one of them 21.
    assert to_target.max() == 21.0 and len(to_target) == 37 and not to_pred.any()
    assert hd95(pred[None], target[None]).tolist() == [0.0]
    # One stray pixel of 37 is outside the tolerance: precision 36/37, recall 1.
    p = 36 / 37
    assert boundary_f1(pred[None], target[None]).item() == pytest.approx(2 * p / (p + 1))


def test_the_percentile_is_numpys_over_both_directions() -> None:
    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.random((3, 1, 40, 48)) > 0.6)
    target = torch.from_numpy(rng.random((3, 1, 40, 48)) > 0.7)
    got = hd95(pred, target)
    for i in range(3):
        a, b = surface_distances(pred[i, 0].numpy(), target[i, 0].numpy())
        assert got[i].item() == pytest.approx(float(np.percentile(np.concatenate([a, b]), 95)))


def test_empty_masks() -> None:
    empty, square = torch.zeros(1, 1, 30, 40, dtype=torch.bool), _masks(30, 40, (slice(3, 9), slice(3, 9)))[None, None]
    # Both empty: nothing to miss, as IoU's 1.0.
    assert hd95(empty, empty).tolist() == [0.0] and boundary_f1(empty, empty).tolist() == [1.0]
    # One empty: the image's diagonal (sqrt(30² + 40²) = 50), and no boundary matched.
    for pred, target in ((empty, square), (square, empty)):
        assert hd95(pred, target).tolist() == [50.0]
        assert boundary_f1(pred, target).tolist() == [0.0]


def test_identical_masks_and_the_edge_of_the_image() -> None:
    # A mask touching the image's edge has its outline along the edge: it matches itself.
    m = _masks(16, 16, (slice(0, 16), slice(0, 6)))[None, None]
    assert hd95(m, m).tolist() == [0.0] and boundary_f1(m, m).tolist() == [1.0]
    pixel = _masks(16, 16, (slice(4, 5), slice(4, 5)))[None, None]
    assert hd95(pixel, pixel).tolist() == [0.0]  # a one-pixel object is its own boundary


def test_batches_shapes_and_errors() -> None:
    pred = torch.stack([A, B, A])[:, None]
    target = torch.stack([B, B, torch.zeros_like(A)])[:, None]
    assert hd95(pred, target).tolist() == [3.0, 0.0, pytest.approx(math.hypot(32, 32))]
    assert hd95(pred[:, 0], target[:, 0]).shape == (3,)  # (B,H,W) as well as (B,1,H,W)
    with pytest.raises(ValueError, match="differ in shape"):
        hd95(pred, target[:2])
    with pytest.raises(ValueError, match="foreground in both"):
        surface_distances(A.numpy(), np.zeros((32, 32), bool))


def test_hausdorff_distance_agrees_with_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for _ in range(5):
        pred = ndimage.binary_opening(rng.random((48, 48)) > 0.55)
        target = ndimage.binary_opening(rng.random((48, 48)) > 0.5)
        to_target, to_pred = surface_distances(pred, target)
        # scikit-image's Hausdorff distance over the same outlines is the largest of our distances.
        outline = [m & ~ndimage.binary_erosion(m) for m in (pred, target)]
        assert max(to_target.max(), to_pred.max()) == pytest.approx(metrics.hausdorff_distance(*outline))


def test_config_names_are_the_metrics_registry() -> None:
    annotation = EvalConfig.model_fields["metrics"].annotation
    assert set(annotation.__args__[0].__args__) == set(BOUNDARY_METRICS)
