"""Per-image Dice and IoU: known answers, the documented empty-mask cases, shapes and errors."""

from __future__ import annotations

import pytest
import torch

from segtune.metrics import dice, iou, masks_from_logits

METRICS = {"dice": dice, "iou": iou}


def _square(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows, cols] = True
    return m


def test_identical_masks_score_one() -> None:
    m = _square(8, 8, slice(2, 5), slice(1, 7))[None, None]
    assert dice(m, m).tolist() == [1.0]
    assert iou(m, m).tolist() == [1.0]


def test_disjoint_masks_score_zero() -> None:
    a = _square(8, 8, slice(0, 3), slice(0, 3))[None, None]
    b = _square(8, 8, slice(5, 8), slice(5, 8))[None, None]
    assert dice(a, b).tolist() == [0.0]
    assert iou(a, b).tolist() == [0.0]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_empty_on_empty_is_one_as_documented(name: str) -> None:
    empty = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    assert METRICS[name](empty, empty).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_empty_prediction_on_a_mask_and_the_reverse_score_zero(name: str) -> None:
    empty = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    full = _square(6, 6, slice(1, 3), slice(1, 4))[None, None]
    assert METRICS[name](empty, full).tolist() == [0.0]
    assert METRICS[name](full, empty).tolist() == [0.0]


def test_partial_overlap_known_answer() -> None:
    # pred: a 2x2 square at rows 1-2, cols 1-2 (4 px); target: a 2x3 square at rows 0-1,
    # cols 0-2 (6 px). They share row 1, cols 1-2: 2 px. Union 4 + 6 - 2 = 8.
    pred = _square(5, 5, slice(1, 3), slice(1, 3))[None, None]
    target = _square(5, 5, slice(0, 2), slice(0, 3))[None, None]
    assert iou(pred, target).item() == pytest.approx(2 / 8)
    assert dice(pred, target).item() == pytest.approx(2 * 2 / (4 + 6))
    # Both are symmetric in their arguments.
    assert iou(target, pred).item() == pytest.approx(0.25)
    assert dice(target, pred).item() == pytest.approx(0.4)


def test_nested_squares_known_answer() -> None:
    # A 2x2 square inside a 2x3 square: intersection 4, union 6.
    pred = _square(4, 4, slice(0, 2), slice(0, 2))
    target = _square(4, 4, slice(0, 2), slice(0, 3))
    assert iou(pred[None], target[None]).item() == pytest.approx(4 / 6)
    assert dice(pred[None], target[None]).item() == pytest.approx(8 / 10)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (3, 5, 7)], ids=["B1HW", "BHW"])
def test_one_score_per_image(name: str, shape: tuple[int, ...]) -> None:
    target = torch.zeros(shape, dtype=torch.bool)
    pred = torch.zeros(shape, dtype=torch.bool)
    target[0, ..., 0:2, 0:2] = True
    pred[0, ..., 0:2, 0:2] = True  # image 0: perfect
    target[1, ..., 0:2, 0:2] = True  # image 1: missed entirely
    # image 2: both empty
    out = METRICS[name](pred, target)
    assert out.shape == (3,)
    assert out.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_float_zero_one_masks_score_like_bool(name: str) -> None:
    pred = _square(5, 5, slice(1, 3), slice(1, 3))[None, None]
    target = _square(5, 5, slice(0, 2), slice(0, 3))[None, None]
    fn = METRICS[name]
    assert fn(pred.float(), target.float()).tolist() == fn(pred, target).tolist()


@pytest.mark.parametrize("name", sorted(METRICS))
def test_shape_mismatch_raises_value_error_with_both_shapes(name: str) -> None:
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 1, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 1, 4, 5\)"):
        METRICS[name](a, b)


def test_masks_from_logits_thresholds_strictly_at_zero() -> None:
    logits = torch.tensor([[-3.0, -1e-6, 0.0, 1e-6, 4.0]])
    assert masks_from_logits(logits).tolist() == [[False, False, False, True, True]]
    assert masks_from_logits(logits, threshold=2.0).tolist() == [[False, False, False, False, True]]
