"""Reading the EPFL EM dataset: both folder layouts, and a DataError naming the file for
each way the raw files can be wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segtune.data import DATASETS, lucchi_em, open_store, prepare_store, synth_em
from segtune.data.lucchi_em import load_split
from segtune.errors import DataError, SegtuneError


def _epfl(root: Path, images: np.ndarray | None = None, masks: np.ndarray | None = None) -> Path:
    """A tiny EPFL-layout folder; either stack of the training split can be replaced."""
    rng = np.random.default_rng(0)
    default_images = rng.integers(0, 256, (3, 64, 96), dtype=np.uint8)
    default_masks = np.where(rng.random((3, 64, 96)) < 0.2, 255, 0).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    stacks = {"training.tif": default_images if images is None else images,
              "training_groundtruth.tif": default_masks if masks is None else masks,
              "testing.tif": default_images, "testing_groundtruth.tif": default_masks}
    for name, stack in stacks.items():
        tifffile.imwrite(root / name, stack, photometric="minisblack")
    return root


def test_epfl_layout_reads_uint8_images_and_0_1_masks(tmp_path: Path) -> None:
    root = _epfl(tmp_path)
    images, masks, source = load_split(root, "train")[:3]
    assert images.shape == masks.shape == (3, 64, 96)
    assert images.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) == {0, 1}
    assert np.array_equal(masks * 255, tifffile.imread(root / "training_groundtruth.tif"))
    assert source == "training.tif"
    assert load_split(root, "test")[2] == "testing.tif"


def test_lucchi_pp_layout_reads_sorted_png_and_tif_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (11, 32, 40), dtype=np.uint8)
    masks = np.where(rng.random((11, 32, 40)) < 0.3, 255, 0).astype(np.uint8)
    for split_in, split_out in (("Train_In", "Train_Out"), ("Test_In", "Test_Out")):
        (tmp_path / split_in).mkdir()
        (tmp_path / split_out).mkdir()
        for i in range(11):
            # Natural order: slice 2 comes before slice 10 although "10" < "2" as text.
            Image.fromarray(images[i]).save(tmp_path / split_in / f"im{i}.png")
            tifffile.imwrite(tmp_path / split_out / f"mask{i}.tif", masks[i])
    (tmp_path / "Train_In" / "notes.txt").write_text("ignored")

    got_images, got_masks, source = load_split(tmp_path, "train")[:3]
    assert np.array_equal(got_images, images)
    assert np.array_equal(got_masks, masks // 255)
    assert source == "Train_In"
    raw = DATASETS["lucchi_em"](tmp_path)
    assert len(raw.files) == 44


def test_registry_builders_return_raw_files_without_decoding(tmp_path: Path) -> None:
    root = _epfl(tmp_path)
    raw = lucchi_em.build(root)
    assert sorted(p.name for p in raw.files) == sorted(
        ["training.tif", "training_groundtruth.tif", "testing.tif", "testing_groundtruth.tif"])
    assert raw.entries == {"train": ("train",), "test": ("test",)} and raw.problems == ()
    items = raw.read("test")
    assert [item.slice for item in items] == [0, 1, 2]
    assert {item.source for item in items} == {"testing.tif"}
    assert items[0].targets[0].name == "mitochondria" and items[0].targets[0].text == ""


def _corrupt(root: Path) -> str:
    _epfl(root)
    data = (root / "training.tif").read_bytes()
    (root / "training.tif").write_bytes(data[:8] + b"\0" * 64)
    return "training.tif"


def _shape_mismatch(root: Path) -> str:
    _epfl(root, masks=np.zeros((2, 64, 96), np.uint8))
    return "training_groundtruth.tif"


def _bad_labels(root: Path) -> str:
    _epfl(root, masks=np.full((3, 64, 96), 128, np.uint8))
    return "training_groundtruth.tif"


def _uint16(root: Path) -> str:
    _epfl(root, images=np.zeros((3, 64, 96), np.uint16))
    return "training.tif"


def _rgb(root: Path) -> str:
    _epfl(root)
    tifffile.imwrite(root / "training.tif", np.zeros((64, 96, 3), np.uint8), photometric="rgb")
    return "training.tif"


def _missing(root: Path) -> str:
    root.mkdir()
    (root / "readme.txt").write_text("")
    return "training.tif"


@pytest.mark.parametrize("make", [_missing, _corrupt, _rgb, _shape_mismatch, _bad_labels,
                                  _uint16])
def test_bad_raw_files_raise_data_error_naming_the_file(tmp_path: Path, make) -> None:
    root = tmp_path / "em"
    name = make(root)
    with pytest.raises(DataError) as info:
        load_split(root, "train")
    message = str(info.value)
    assert name in message and "\n" not in message
    assert isinstance(info.value, SegtuneError)


def test_missing_files_message_lists_both_layouts_and_what_was_found(tmp_path: Path) -> None:
    _missing(tmp_path / "em")
    raw = lucchi_em.build(tmp_path / "em")
    assert raw.entries == {"train": (), "test": ()} and len(raw.problems) == 2
    message = raw.problems[0]
    for expected in ("training.tif", "training_groundtruth.tif", "Train_In/", "readme.txt"):
        assert expected in message


def test_masks_in_0_1_are_accepted(tmp_path: Path) -> None:
    masks = np.zeros((3, 64, 96), np.uint8)
    masks[:, 10:20, 10:20] = 1
    _epfl(tmp_path, masks=masks)
    assert np.array_equal(load_split(tmp_path, "train")[1], masks)


def test_unknown_split_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_split(_epfl(tmp_path), "val")


def test_two_768x1024_slices_give_24_patches_per_split(tmp_path: Path) -> None:
    root = synth_em(tmp_path / "em", slices=2)
    store = open_store(prepare_store("lucchi_em", root, tmp_path / "cache", drop_empty=False))
    counts = store.index["counts"]["samples"]
    assert counts["train"] + counts["val"] == 24 and counts["test"] == 24
    assert counts["val"] == round(0.2 * 24)
    assert {(s["y"], s["x"]) for s in store.index["samples"]} == {
        (y, x) for y in (0, 256, 512) for x in (0, 256, 512, 768)}
    kept = open_store(prepare_store("lucchi_em", root, tmp_path / "cache"))
    dropped = kept.index["counts"]["dropped_empty"]
    assert sum(kept.index["counts"]["samples"].values()) == 48 - dropped["train"] - dropped["test"]


def test_every_problem_of_a_split_is_reported_together(tmp_path: Path) -> None:
    _epfl(tmp_path, images=np.zeros((3, 64, 96), np.uint16),
          masks=np.full((3, 64, 96), 128, np.uint8))
    with pytest.raises(DataError) as info:
        load_split(tmp_path, "train")
    assert info.value.problems[0].startswith(str(tmp_path / "training.tif"))
    assert info.value.problems[1].startswith(str(tmp_path / "training_groundtruth.tif"))
