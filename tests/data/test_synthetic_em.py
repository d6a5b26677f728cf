"""The synthetic EM twin: real EPFL file layout, deterministic, and not a threshold task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segtune.data import synth_em
from segtune.data.lucchi_em import EPFL_FILES, load_split

FILES = [name for pair in EPFL_FILES.values() for name in pair]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_em(tmp_path_factory.mktemp("em"), slices=2, height=512, width=512, seed=3)


def test_writes_the_epfl_layout_as_uint8_stacks(small: Path) -> None:
    assert sorted(p.name for p in small.iterdir()) == sorted(FILES)
    for name in FILES:
        stack = tifffile.imread(small / name)
        assert stack.shape == (2, 512, 512) and stack.dtype == np.uint8
        with tifffile.TiffFile(small / name) as tif:
            assert len(tif.pages) == 2  # multi-page, one page per slice like the release


def test_labels_are_exactly_0_and_255_and_every_slice_has_mitochondria(small: Path) -> None:
    for name in ("training_groundtruth.tif", "testing_groundtruth.tif"):
        masks = tifffile.imread(small / name)
        assert set(np.unique(masks).tolist()) == {0, 255}
        assert all(page.any() for page in masks)
        assert 0.01 < (masks > 0).mean() < 0.3


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a = synth_em(tmp_path / "a", slices=1, height=256, width=256, seed=7)
    b = synth_em(tmp_path / "b", slices=1, height=256, width=256, seed=7)
    c = synth_em(tmp_path / "c", slices=1, height=256, width=256, seed=8)
    for name in FILES:
        assert np.array_equal(tifffile.imread(a / name), tifffile.imread(b / name))
    assert not np.array_equal(tifffile.imread(a / "training.tif"),
                              tifffile.imread(c / "training.tif"))
    # Training and testing come from different streams, not the same slices twice.
    assert not np.array_equal(tifffile.imread(a / "training.tif"),
                              tifffile.imread(a / "testing.tif"))


def test_distractors_are_dark_so_a_threshold_is_not_enough(small: Path) -> None:
    images, masks, _ = load_split(small, "train")[:3]
    fg = masks.astype(bool)
    assert images[fg].mean() < images[~fg].mean() - 30  # mitochondria are dark...
    dark = images < np.median(images[fg]) + 15
    assert (dark & ~fg).sum() / dark.sum() > 0.25  # ...and so is much that is not labelled
    best_iou = max(((images < t) & fg).sum() / ((images < t) | fg).sum()
                   for t in range(40, 200, 4))
    assert best_iou < 0.65


def test_default_slice_puts_mitochondria_in_most_256_tiles(tmp_path: Path) -> None:
    synth_em(tmp_path, slices=1)
    masks = tifffile.imread(tmp_path / "training_groundtruth.tif")
    assert masks.shape == (1, 768, 1024)
    tiles = masks[0].reshape(3, 256, 4, 256).transpose(0, 2, 1, 3).reshape(12, -1)
    assert tiles.any(axis=1).sum() >= 10


def test_rejects_degenerate_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slices"):
        synth_em(tmp_path, slices=0)
