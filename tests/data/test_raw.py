"""Validation: every kind of raw-file problem is reported with the file and what was expected,
all problems in one report, and a failed prepare leaves no store behind; and the shared
readers behind it (accepted image and mask encodings, the seeded split)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segtune.data import DataProblems, check_dataset, prepare_store
from segtune.data.readers import binary_mask, read_image, read_labels, split_by_seed
from segtune.errors import ConfigError, DataError, SegtuneError


def _folder(root: Path, count: int = 3, size: tuple[int, int] = (64, 64)) -> Path:
    """A valid folder dataset: grey images, each mask a white square."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = np.zeros(size, np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(np.full(size, 100, np.uint8)).save(root / "images" / f"x{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"x{i}.png")
    return root


def _problems(root: Path, name: str = "folder", **kwargs) -> list[str]:
    with pytest.raises(DataProblems) as info:
        check_dataset(name, root, patch_size=32, **kwargs)
    assert isinstance(info.value, SegtuneError)
    message = str(info.value)
    assert message.startswith(f"{len(info.value.problems)} problem")
    assert all(problem in message for problem in info.value.problems)
    return info.value.problems


def test_a_valid_folder_passes(tmp_path: Path) -> None:
    result = check_dataset("folder", _folder(tmp_path), patch_size=32)
    assert result["items"] == {"train": 2, "test": 1} and result["classes"] == {"foreground": 3}
    assert result["samples"] == {"train": 2, "test": 1}  # only the top-left tile has the square
    assert result["dropped_empty"] == {"train": 6, "test": 3}


def test_missing_pair(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "masks" / "x1.png").rename(root / "masks" / "y1.png")
    problems = _problems(root)
    assert f"{root / 'images/x1.png'}: no mask; expected {root / 'masks/x1.png'}." in problems
    assert (f"{root / 'masks/y1.png'}: a mask without an image; expected "
            f"{root / 'images/y1.png'}.") in problems


def test_unreadable_or_truncated_file(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    data = (root / "images" / "x0.png").read_bytes()
    (root / "images" / "x0.png").write_bytes(data[: len(data) // 2])
    (root / "masks" / "x2.png").write_text("not a png")
    problems = _problems(root)
    assert len(problems) == 2
    assert problems[0].startswith(f"{root / 'images/x0.png'}: unreadable as an image")
    assert "truncated" in problems[0]
    assert problems[1].startswith(f"{root / 'masks/x2.png'}: unreadable as a mask")


def test_image_mask_size_mismatch(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((64, 48), np.uint8)).save(root / "masks" / "x1.png")
    (problem,) = _problems(root)
    assert problem == (f"{root / 'masks/x1.png'}: 48x64 pixels but its image "
                       f"{root / 'images/x1.png'} is 64x64; a mask must have its image's size "
                       f"(width x height).")


def test_mask_values_outside_the_binary_set(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    mask = np.zeros((64, 64), np.uint8)
    mask[:4], mask[4:8] = 1, 2
    Image.fromarray(mask).save(root / "masks" / "x0.png")
    (problem,) = _problems(root)
    assert problem.startswith(f"{root / 'masks/x0.png'}: mask values [0, 1, 2]; expected only "
                              f"0 (background) and 255 (foreground), or 0 and 1.")


def test_slice_count_mismatch(tmp_path: Path) -> None:
    stack = np.zeros((3, 64, 64), np.uint8)
    for name, array in (("training.tif", stack), ("training_groundtruth.tif", stack[:2]),
                        ("testing.tif", stack), ("testing_groundtruth.tif", stack + 255)):
        tifffile.imwrite(tmp_path / name, array, photometric="minisblack")
    (problem,) = _problems(tmp_path, "lucchi_em")
    assert problem.startswith(f"{tmp_path / 'training_groundtruth.tif'}: 2 label slices but "
                              f"{tmp_path / 'training.tif'} has 3 image slices; expected one "
                              f"label slice per image slice.")


def test_empty_after_filtering(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    for path in (root / "masks").iterdir():
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    problems = _problems(root)
    assert len(problems) == 2  # train and test
    assert problems[0].startswith(f"{root}: the train split is empty after cutting into 32x32 "
                                  f"patches (tile) and filtering: 2 images read; 8 patches "
                                  f"dropped because their mask is empty")
    assert check_dataset("folder", root, patch_size=32, drop_empty=False)["samples"] == {
        "train": 8, "test": 4}


def test_all_problems_in_one_report_and_no_store(tmp_path: Path) -> None:
    root = _folder(tmp_path / "raw", count=5)
    (root / "masks" / "x0.png").unlink()
    (root / "images" / "x1.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(root / "masks" / "x2.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "x3.png")
    with pytest.raises(DataProblems) as info:
        prepare_store("folder", root, tmp_path / "cache", patch_size=32)
    message = str(info.value)
    assert message.startswith(f"4 problems in the folder data at {root}; nothing was prepared:")
    for stem in ("images/x0.png", "images/x1.png", "masks/x2.png", "masks/x3.png"):
        assert f"  - {root / stem}: " in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_images_are_converted_to_the_dataset_channels(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 5, 3), (30, 60, 90), np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.full((4, 5), 70, np.uint8)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "c.png", 3).shape == (4, 5, 3)
    assert read_image(tmp_path / "c.png", 1).shape == (4, 5)
    assert (read_image(tmp_path / "g.png", 3) == 70).all()


def test_wide_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5), np.uint16)).save(tmp_path / "w.png")
    with pytest.raises(DataError, match="16-bit or float"):
        read_image(tmp_path / "w.png", 1)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "RGBA"])
def test_black_and_white_masks_in_any_common_mode(tmp_path: Path, mode: str) -> None:
    values = np.zeros((6, 8), np.uint8)
    values[2:4, 3:6] = 255
    Image.fromarray(values).convert(mode).save(tmp_path / "m.png")
    mask = binary_mask(read_labels(tmp_path / "m.png"), tmp_path / "m.png")
    assert mask.dtype == np.uint8 and np.array_equal(mask, values // 255)


def test_colour_masks_are_refused(tmp_path: Path) -> None:
    values = np.zeros((6, 8, 3), np.uint8)
    values[0, 0] = (255, 0, 0)
    Image.fromarray(values).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="colour mask"):
        read_labels(tmp_path / "m.png")


def test_binary_mask_accepts_0_1_and_0_255_but_not_both() -> None:
    assert binary_mask(np.array([[0, 1]], np.uint8), Path("m")).tolist() == [[0, 1]]
    assert binary_mask(np.array([[0, 255]], np.uint8), Path("m")).tolist() == [[0, 1]]
    with pytest.raises(DataError, match=r"mask values \[0, 1, 255\]"):
        binary_mask(np.array([[0, 1, 255]], np.uint8), Path("m"))
    with pytest.raises(DataError, match="int16 labels in"):
        binary_mask(np.array([[-1, 0]], np.int16), Path("m"))


def test_split_by_seed_is_deterministic_and_order_free() -> None:
    keys = [f"k{i}" for i in range(10)]
    test = split_by_seed(keys, 0.3, 0)
    assert len(test) == 3 and test == split_by_seed(reversed(keys), 0.3, 0)
    assert split_by_seed(["a", "b"], 0.1, 0) and len(split_by_seed(["a", "b"], 0.9, 0)) == 1
    with pytest.raises(ConfigError, match="test_fraction"):
        split_by_seed(keys, 1.0, 0)
