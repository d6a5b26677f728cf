"""The generic folder dataset: images/ and masks/ matched by stem, grey or colour, tiles or
a resize, a seeded split by image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.data import DATASETS, check_dataset, open_store, prepare_store, synth_folder
from segtune.errors import DataError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_folder(tmp_path_factory.mktemp("folder"), images=6)


def _write(root: Path, stem: str, image: np.ndarray, mask: np.ndarray,
           suffix: str = ".png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}{suffix}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_twin_writes_matching_stems_with_a_jpeg(shapes: Path) -> None:
    images = sorted(p.name for p in (shapes / "images").iterdir())
    masks = sorted(p.name for p in (shapes / "masks").iterdir())
    assert images[0] == "sample_000.jpg" and images[1:] == masks[1:]
    assert [Path(name).stem for name in images] == [Path(name).stem for name in masks]
    for name in masks:
        assert set(np.unique(np.asarray(Image.open(shapes / "masks" / name))).tolist()) == {0, 255}


def test_colour_tiles_and_a_split_by_image(shapes: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("folder", shapes, tmp_path, drop_empty=False))
    samples = store.index["samples"]
    # 320x256 images give one 256x256 tile each (the 64-pixel remainder is dropped).
    assert len(samples) == 6 and {(s["y"], s["x"]) for s in samples} == {(0, 0)}
    assert store.channels == 3 and store.index["counts"]["samples"]["test"] == 1
    assert {s["class"] for s in samples} == {"foreground"} and {s["text"] for s in samples} == {""}
    for sample, mask in zip(samples, np.load(store.path / "masks.npy"), strict=False):
        stem = Path(sample["source"]).stem
        raw = np.asarray(Image.open(shapes / "masks" / f"{stem}.png")) // 255
        assert np.array_equal(mask, raw[:256, :256])


def test_a_square_at_a_known_place_lines_up(tmp_path: Path) -> None:
    expected = np.zeros((200, 300), bool)
    expected[50:90, 150:230] = True  # across the tiles at x=100 and x=200
    for i in range(3):
        image = np.where(expected, 220, 30).astype(np.uint8)
        _write(tmp_path / "raw", f"g{i}", image, expected.astype(np.uint8))  # 0/1 is accepted
    store = open_store(prepare_store("folder", tmp_path / "raw", tmp_path / "cache",
                                     patch_size=100))
    assert store.channels == 1  # all grey: stored grey
    assert {(s["y"], s["x"]) for s in store.index["samples"]} == {(0, 100), (0, 200)}
    items = [split[i] for split in map(store.split, ("train", "val", "test"))
             for i in range(len(split))]
    assert len(items) == 6
    for item in items:
        x = store.index["samples"][item["index"]]["x"]
        mask = item["mask"][0].numpy().astype(bool)
        assert np.array_equal(mask, expected[:100, x:x + 100])
        assert (item["image"][0].numpy()[mask] == 220).all()
        assert (item["image"][0].numpy()[~mask] == 30).all()


def test_grey_images_are_repeated_when_others_are_colour(tmp_path: Path) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[:8] = 255
    _write(tmp_path, "grey", np.full((64, 64), 77, np.uint8), mask)
    _write(tmp_path, "colour", np.full((64, 64, 3), (10, 20, 30), np.uint8), mask)
    raw = DATASETS["folder"](tmp_path)
    assert raw.channels == 3
    (grey,) = raw.read(next(e for split in raw.entries.values() for e in split
                            if e[0].stem == "grey"))
    assert grey.image.shape == (64, 64, 3) and (grey.image == 77).all()


def test_small_images_need_resize_and_say_so(tmp_path: Path) -> None:
    for i in range(3):
        mask = np.zeros((60, 80), np.uint8)
        mask[10:30, 10:30] = 255
        _write(tmp_path / "raw", f"s{i}", np.full((60, 80), 90, np.uint8), mask)
    with pytest.raises(DataError) as info:
        check_dataset("folder", tmp_path / "raw", patch_size=64)
    assert "smaller than the 64x64 tiles (set dataset.fit=resize" in str(info.value)
    result = check_dataset("folder", tmp_path / "raw", patch_size=64, fit="resize")
    assert result["samples"] == {"train": 2, "test": 1}


def test_duplicate_stems_and_missing_folders_are_problems(tmp_path: Path) -> None:
    mask = np.full((32, 32), 255, np.uint8)
    _write(tmp_path, "a", np.zeros((32, 32), np.uint8), mask)
    _write(tmp_path, "a", np.zeros((32, 32), np.uint8), mask, suffix=".jpg")
    raw = DATASETS["folder"](tmp_path)
    assert any("another file has the stem 'a'" in p for p in raw.problems)
    (tmp_path / "other").mkdir()
    raw = DATASETS["folder"](tmp_path / "other")
    assert len(raw.problems) == 2 and "expected the folder of images" in raw.problems[0]


def test_hash_is_stable_across_regeneration(shapes: Path, tmp_path: Path) -> None:
    again = synth_folder(tmp_path / "again", images=6)
    first = open_store(prepare_store("folder", shapes, tmp_path / "a"))
    second = open_store(prepare_store("folder", again, tmp_path / "b"))
    assert first.hash == second.hash
