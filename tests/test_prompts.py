"""Prompts from masks: reproducible from a seed, inside the mask, tight boxes, empty masks, stacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segtune.prompts import PROMPTS, Prompt, PromptOptions, box, needs_foreground, stack

H, W = 24, 40  # not square, so swapped x/y would land outside the masks below
OPTS = PromptOptions(text="mitochondria")  # every strategy can run with these
POINT_PROMPTS = sorted(n for n in PROMPTS if PROMPTS[n](np.ones((4, 4), np.uint8), np.random.default_rng(0),
                                                        OPTS).points is not None)


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
    masks["edge"] = np.zeros((H, W), np.uint8)
    masks["edge"][:, -3:] = 1  # touching the image border
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
    m[2:6, 2:8] = 1  # 24 px
    m[16:22, 28:38] = 1  # 60 px; the centroid lies between the blobs, on background
    return m


NON_CONVEX = {"ring": _ring(), "l_shape": _l_shape(), "two_blobs": _two_blobs()}
ALL_MASKS = {**_random_masks(), **NON_CONVEX}


def _run(name: str, mask: np.ndarray, seed: int = 0, opts: PromptOptions = OPTS) -> Prompt:
    return PROMPTS[name](mask, np.random.default_rng(seed), opts)


def _inside(mask: np.ndarray, prompt: Prompt) -> bool:
    assert prompt.points is not None
    return all(mask[int(y), int(x)] == 1 for x, y in prompt.points)


def test_point_strategies_are_found() -> None:
    assert {"random_point", "center_point", "k_points"} <= set(POINT_PROMPTS)


@pytest.mark.parametrize("name", sorted(PROMPTS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_same_seed_same_prompt(name: str, train: bool) -> None:
    opts = PromptOptions(train=train, text="fire")
    a, b = _run(name, ALL_MASKS["rects0"], 7, opts), _run(name, ALL_MASKS["rects0"], 7, opts)
    for field in ("points", "labels", "box", "text"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None)
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y


def test_random_point_varies_with_the_seed() -> None:
    drawn = {tuple(_run("random_point", ALL_MASKS["rects1"], s).points[0]) for s in range(20)}
    assert len(drawn) > 5


def test_center_point_ignores_the_generator() -> None:
    drawn = {tuple(_run("center_point", _l_shape(), s).points[0]) for s in range(5)}
    assert len(drawn) == 1


@pytest.mark.parametrize("name", POINT_PROMPTS)
@pytest.mark.parametrize("mask_name", sorted(ALL_MASKS))
def test_points_lie_inside_the_mask(name: str, mask_name: str) -> None:
    mask = ALL_MASKS[mask_name]
    for seed in range(5):
        p = _run(name, mask, seed)
        n = len(p.points)
        assert p.points.shape == (n, 2) and n >= 1 and p.points.dtype == np.float32
        assert p.labels.tolist() == [1] * n and p.labels.dtype == np.int64
        assert _inside(mask, p), (mask_name, p.points)


@pytest.mark.parametrize("name", ["random_point", "center_point"])
def test_single_point_strategies_give_one_point(name: str) -> None:
    assert _run(name, ALL_MASKS["rects2"]).points.shape == (1, 2)


def test_center_point_of_a_solid_square_is_its_centre() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[5:10, 20:25] = 1  # rows 5..9, cols 20..24: centre (x=22, y=7)
    assert _run("center_point", mask).points.tolist() == [[22.0, 7.0]]


def test_center_point_is_deep_inside_not_on_the_border() -> None:
    # A bar 2 px wide joined to a 9x9 square: the deepest pixel is the square's centre.
    mask = np.zeros((H, W), np.uint8)
    mask[10:12, 2:30] = 1
    mask[6:15, 28:37] = 1  # rows 6..14, cols 28..36: centre (x=32, y=10)
    assert _run("center_point", mask).points.tolist() == [[32.0, 10.0]]


def test_center_point_treats_the_image_border_as_boundary() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[:, :9] = 1  # a band along the left edge, 9 px wide: deepest column is x=4
    (x, y), = _run("center_point", mask).points
    assert x == 4 and 4 <= y <= H - 5


@pytest.mark.parametrize("mask_name", sorted(NON_CONVEX))
def test_center_point_of_a_non_convex_mask_is_on_the_mask(mask_name: str) -> None:
    mask = NON_CONVEX[mask_name]
    ys, xs = np.nonzero(mask)
    assert mask[round(ys.mean()), round(xs.mean())] == 0  # the centroid is off the mask
    p = _run("center_point", mask)
    assert _inside(mask, p)


def test_k_points_known_answer_one_per_component_largest_first() -> None:
    mask = _two_blobs()
    p = _run("k_points", mask, opts=PromptOptions(k=3))
    assert p.points.shape == (3, 2) and p.labels.tolist() == [1, 1, 1]
    (x0, y0), (x1, y1), _ = p.points
    assert 28 <= x0 < 38 and 16 <= y0 < 22  # the 60 px blob first
    assert 2 <= x1 < 8 and 2 <= y1 < 6  # then the 24 px blob
    assert _inside(mask, p)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_points_gives_k_points(k: int) -> None:
    p = _run("k_points", ALL_MASKS["rects3"], opts=PromptOptions(k=k))
    assert p.points.shape == (k, 2) and p.labels.shape == (k,)


@pytest.mark.parametrize("mask_name", sorted(ALL_MASKS))
def test_box_is_the_tight_bounding_box_at_eval(mask_name: str) -> None:
    mask = ALL_MASKS[mask_name]
    ys, xs = np.nonzero(mask)
    p = _run("box", mask, opts=PromptOptions(train=False))
    assert p.points is None and p.labels is None
    assert p.box.dtype == np.float32
    assert p.box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_box_known_answer() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[3:8, 2:10] = 1  # rows 3..7, cols 2..9; SAM boxes are x0, y0, x1, y1 inclusive
    assert box(mask, np.random.default_rng(0), PromptOptions()).box.tolist() == [2.0, 3.0, 9.0, 7.0]


def test_box_jitter_at_train_moves_sides_outward_within_the_limit_and_the_image() -> None:
    mask = np.zeros((H, W), np.uint8)
    mask[8:14, 12:25] = 1
    tight = np.array([12, 8, 24, 13], np.float32)
    opts = PromptOptions(train=True, box_jitter=5)
    boxes = np.stack([box(mask, np.random.default_rng(s), opts).box for s in range(30)])
    grow = (boxes - tight) * np.array([-1, -1, 1, 1])  # outward movement of each side
    assert (grow >= 0).all() and (grow <= 5).all()
    assert len({tuple(b) for b in boxes}) > 1  # it does jitter
    # Near the border the box is clipped to the image.
    corner = np.zeros((H, W), np.uint8)
    corner[0:3, W - 3 :] = 1
    big = PromptOptions(train=True, box_jitter=50)
    for s in range(10):
        x0, y0, x1, y1 = box(corner, np.random.default_rng(s), big).box
        assert 0 <= x0 <= W - 3 and y0 == 0 and x1 == W - 1 and 2 <= y1 <= H - 1
    # No jitter: tight even at train time.
    assert box(mask, np.random.default_rng(0), PromptOptions(train=True, box_jitter=0)).box.tolist() == tight.tolist()


def test_text_prompt_carries_the_text_and_needs_one() -> None:
    assert _run("text", ALL_MASKS["rects0"], opts=PromptOptions(text="fire")).text == "fire"
    with pytest.raises(ValueError, match="prompt.text"):
        _run("text", ALL_MASKS["rects0"], opts=PromptOptions())


def test_none_prompt_is_empty() -> None:
    assert _run("none", ALL_MASKS["rects0"]) == Prompt()


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_empty_mask_is_refused_exactly_where_needs_foreground_says(name: str) -> None:
    empty = np.zeros((H, W), np.uint8)
    if needs_foreground(name):
        with pytest.raises(ValueError, match="empty"):
            _run(name, empty)
    else:
        assert _run(name, empty) == _run(name, ALL_MASKS["rects0"])  # the mask is not read


def test_needs_foreground_for_points_and_boxes_only() -> None:
    assert {n for n in PROMPTS if needs_foreground(n)} == {"random_point", "center_point", "k_points", "box",
                                                          "jittered_box"}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_stack_shapes_and_dtypes(name: str) -> None:
    masks = [ALL_MASKS["rects0"], _l_shape(), _ring()]
    prompts = [_run(name, m, i) for i, m in enumerate(masks)]
    batch = stack(prompts)
    first = prompts[0]
    if first.points is not None:
        n = len(first.points)
        assert batch.points.shape == (3, n, 2) and batch.points.dtype == torch.float32
        assert batch.labels.shape == (3, n) and batch.labels.dtype == torch.int64
        assert np.array_equal(batch.points[2].numpy(), prompts[2].points)
    else:
        assert batch.points is None and batch.labels is None
    if first.box is not None:
        assert batch.boxes.shape == (3, 4) and batch.boxes.dtype == torch.float32
        assert np.array_equal(batch.boxes[0].numpy(), prompts[0].box)
    else:
        assert batch.boxes is None
    assert batch.texts == (None if first.text is None else [p.text for p in prompts])
    moved = batch.to(torch.device("cpu"))
    for field in ("points", "labels", "boxes"):
        a, b = getattr(batch, field), getattr(moved, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert moved.texts == batch.texts
