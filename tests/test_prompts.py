"""Prompts from masks: reproducible from a seed, inside the mask, tight boxes, stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.prompts import PROMPTS, Prompt, box, center_point, random_point, stack

POINT_PROMPTS = ["random_point", "center_point"]
H, W = 24, 40  # not square, so swapped x/y would land outside the masks below


def _random_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    masks: dict[str, np.ndarray] = {}
    for i in range(4):  # a few random rectangles each
        m = np.zeros((H, W), np.uint8)
        for _ in range(3):
            y0, x0 = rng.integers(0, H - 4), rng.integers(0, W - 4)
            m[y0 : y0 + rng.integers(2, 6), x0 : x0 + rng.integers(2, 8)] = 1
        masks[f"rects{i}"] = m
    masks["speckle"] = (rng.random((H, W)) < 0.05).astype(np.uint8)
    single = np.zeros((H, W), np.uint8)
    single[3, 31] = 1  # x=31 is beyond H, so an (x, y) swap fails loudly
    masks["single_pixel"] = single
    return masks


def _ring() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    r2 = (yy - 12) ** 2 + (xx - 20) ** 2
    return ((r2 <= 10**2) & (r2 >= 6**2)).astype(np.uint8)  # centroid (20, 12) is in the hole


def _l_shape() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[2:22, 2:6] = 1  # the vertical bar
    m[18:22, 2:36] = 1  # the foot; the centroid lies in the empty corner between them
    return m


def _two_blobs() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[2:6, 2:6] = 1
    m[18:22, 32:38] = 1  # centroid between the blobs, on background
    return m


NON_CONVEX = {"ring": _ring(), "l_shape": _l_shape(), "two_blobs": _two_blobs()}
ALL_MASKS = {**_random_masks(), **NON_CONVEX}


def _inside(mask: np.ndarray, prompt: Prompt) -> bool:
    assert prompt.points is not None
    return all(mask[int(y), int(x)] == 1 for x, y in prompt.points)


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_same_seed_same_prompt(name: str) -> None:
    mask = ALL_MASKS["rects0"]
    a = PROMPTS[name](mask, np.random.default_rng(7))
    b = PROMPTS[name](mask, np.random.default_rng(7))
    for field in ("points", "labels", "box"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if x is not None:
            assert np.array_equal(x, y)


def test_random_point_varies_with_the_seed() -> None:
    mask = ALL_MASKS["rects1"]
    drawn = {tuple(random_point(mask, np.random.default_rng(s)).points[0]) for s in range(20)}
    assert len(drawn) > 5


def test_center_point_ignores_the_generator() -> None:
    mask = _l_shape()
    drawn = {tuple(center_point(mask, np.random.default_rng(s)).points[0]) for s in range(5)}
    assert len(drawn) == 1


@pytest.mark.parametrize("name", POINT_PROMPTS)
@pytest.mark.parametrize("mask_name", sorted(ALL_MASKS))
def test_points_lie_inside_the_mask(name: str, mask_name: str) -> None:
    mask = ALL_MASKS[mask_name]
    for seed in range(5):
        p = PROMPTS[name](mask, np.random.default_rng(seed))
        assert p.points is not None and p.points.shape == (1, 2) and p.points.dtype == np.float32
        assert p.labels is not None and p.labels.tolist() == [1] and p.labels.dtype == np.int64
        assert _inside(mask, p), (mask_name, p.points)


def test_center_point_of_a_solid_square_is_its_centre() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[5:10, 20:25] = 1  # rows 5..9, cols 20..24: centre (x=22, y=7)
    assert center_point(mask, np.random.default_rng(0)).points.tolist() == [[22.0, 7.0]]


@pytest.mark.parametrize("mask_name", sorted(NON_CONVEX))
def test_center_point_of_a_non_convex_mask_is_on_the_mask_nearest_the_centroid(mask_name: str) -> None:
    mask = NON_CONVEX[mask_name]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    assert mask[int(round(cy)), int(round(cx))] == 0  # the centroid itself is off the mask
    (x, y), = center_point(mask, np.random.default_rng(0)).points
    assert mask[int(y), int(x)] == 1
    assert (x - cx) ** 2 + (y - cy) ** 2 == pytest.approx(((xs - cx) ** 2 + (ys - cy) ** 2).min())


@pytest.mark.parametrize("mask_name", sorted(ALL_MASKS))
def test_box_is_the_tight_bounding_box(mask_name: str) -> None:
    mask = ALL_MASKS[mask_name]
    ys, xs = np.nonzero(mask)
    p = box(mask, np.random.default_rng(0))
    assert p.points is None and p.labels is None
    assert p.box is not None and p.box.dtype == np.float32
    assert p.box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_box_known_answer() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[3:8, 2:10] = 1  # rows 3..7, cols 2..9; SAM boxes are x0, y0, x1, y1 inclusive
    assert box(mask, np.random.default_rng(0)).box.tolist() == [2.0, 3.0, 9.0, 7.0]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_empty_mask_falls_back_inside_the_image_with_the_usual_shapes(name: str) -> None:
    empty = np.zeros((H, W), np.uint8)
    full = ALL_MASKS["rects0"]
    p = PROMPTS[name](empty, np.random.default_rng(0))
    q = PROMPTS[name](full, np.random.default_rng(0))
    for field in ("points", "labels", "box"):
        x, y = getattr(p, field), getattr(q, field)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype
            assert np.isfinite(x).all()
    if p.points is not None:
        (x, y), = p.points
        assert 0 <= x < W and 0 <= y < H
        assert p.labels.tolist() == [1]
    if p.box is not None:
        assert p.box.tolist() == [0, 0, W - 1, H - 1]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_stack_shapes_and_dtypes(name: str) -> None:
    # A mixed batch (one empty mask) still stacks: the fallback has the usual shapes.
    masks = [ALL_MASKS["rects0"], np.zeros((H, W), np.uint8), _ring()]
    prompts = [PROMPTS[name](m, np.random.default_rng(i)) for i, m in enumerate(masks)]
    batch = stack(prompts)
    if prompts[0].points is not None:
        assert batch.points.shape == (3, 1, 2) and batch.points.dtype == torch.float32
        assert batch.labels.shape == (3, 1) and batch.labels.dtype == torch.int64
        assert batch.boxes is None
        assert np.array_equal(batch.points[2].numpy(), prompts[2].points)
    else:
        assert batch.points is None and batch.labels is None
        assert batch.boxes.shape == (3, 4) and batch.boxes.dtype == torch.float32
        assert np.array_equal(batch.boxes[0].numpy(), prompts[0].box)
    moved = batch.to(torch.device("cpu"))
    for field in ("points", "labels", "boxes"):
        a, b = getattr(batch, field), getattr(moved, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
