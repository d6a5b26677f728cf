"""Cityscapes: the real layout, class selection by cityscapesscripts label ids, one sample per
(image, class present), whole scenes resized to the patch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as LABELS
from cityscapesscripts.helpers.labels import name2label
from PIL import Image

from segtune.data import DATASETS, check_dataset, open_store, prepare_store, synth_cityscapes
from segtune.data.cityscapes import DEFAULT_CLASSES
from segtune.errors import ConfigError, DataError

CAR, ROAD = name2label["car"].id, name2label["road"].id


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_cityscapes(tmp_path_factory.mktemp("cityscapes"), train=4, val=2)


def _labels(root: Path) -> dict[str, np.ndarray]:
    """leftImg8bit path (relative to root) -> its label-id map."""
    out = {}
    for path in sorted((root / "gtFine").glob("*/*/*_gtFine_labelIds.png")):
        image = path.relative_to(root / "gtFine").as_posix().replace("_gtFine_labelIds",
                                                                      "_leftImg8bit")
        out[f"leftImg8bit/{image}"] = np.asarray(Image.open(path))
    return out


def test_twin_writes_the_real_layout_with_real_label_ids(scenes: Path) -> None:
    images = sorted(p.relative_to(scenes).as_posix() for p in scenes.rglob("*_leftImg8bit.png"))
    assert images[0] == "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert len(images) == 6 and sum("/val/frankfurt/" in p for p in images) == 2
    known = {label.id for label in LABELS if label.id >= 0}
    for source, labels in _labels(scenes).items():
        assert labels.dtype == np.uint8 and labels.shape == (256, 512)
        assert set(np.unique(labels).tolist()) <= known
        assert Image.open(scenes / source).mode == "RGB"
    assert len(list(scenes.rglob("*_gtFine_color.png"))) == 6


def test_one_sample_per_image_and_class_present(scenes: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("cityscapes", scenes, tmp_path, patch_size=64))
    labels = _labels(scenes)
    expected = {(source, name) for source, label in labels.items() for name in DEFAULT_CLASSES
                if (label == name2label[name].id).any()}
    samples = store.index["samples"]
    assert {(s["source"], s["class"]) for s in samples} == expected
    assert len(samples) == len(expected)  # nothing vanished in the resize here
    assert all(s["text"] == s["class"] for s in samples)
    assert {s["source"].split("/")[1] for s in samples if s["split"] == "test"} == {"val"}
    assert {s["source"].split("/")[1] for s in samples if s["split"] != "test"} == {"train"}
    # Persons appear only in the odd images, so class presence really is per image.
    persons = {"_".join(Path(s["source"]).name.split("_")[:2]) for s in samples
               if s["class"] == "person"}
    assert persons == {"aachen_000001", "aachen_000003", "frankfurt_000001"}
    images = np.load(store.path / "images.npy")
    assert images.shape == (6, 64, 64, 3) and store.channels == 3
    assert store.index["params"]["fit"] == "resize"


def test_masks_are_the_class_ids_resized_with_nearest(scenes: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("cityscapes", scenes, tmp_path, patch_size=64,
                                     options={"classes": ["car", "road"]}))
    labels = _labels(scenes)
    train = store.split("train")
    assert len(train) > 0
    for i in range(len(train)):
        item = train[i]
        sample = store.index["samples"][item["index"]]
        target = name2label[sample["class"]].id
        wanted = Image.fromarray((labels[sample["source"]] == target).astype(np.uint8))
        resized = np.asarray(wanted.resize((64, 64), Image.Resampling.NEAREST))
        assert np.array_equal(item["mask"][0].numpy(), resized)
    assert set(store.index["counts"]["classes"]) == {"car", "road"}


def test_a_car_at_a_known_place_lines_up_with_its_pixels(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    labels = np.full((256, 512), ROAD, np.uint8)
    labels[100:150, 200:300] = CAR
    image = np.zeros((256, 512, 3), np.uint8)
    image[100:150, 200:300] = (0, 0, 200)
    for folder, city in (("train", "aachen"), ("val", "bonn")):
        stem = f"{city}_000000_000019"
        images, gt = root / "leftImg8bit" / folder / city, root / "gtFine" / folder / city
        images.mkdir(parents=True)
        gt.mkdir(parents=True)
        Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
        Image.fromarray(labels).save(gt / f"{stem}_gtFine_labelIds.png")
    store = open_store(prepare_store("cityscapes", root, tmp_path / "cache", patch_size=128,
                                     val_fraction=0.0, options={"classes": ["car"]}))
    item = store.split("test")[0]
    mask = item["mask"][0].numpy().astype(bool)
    # 512x256 -> 128x128: x scaled by 1/4, y by 1/2, so the car spans rows 50-75, cols 50-75.
    expected = np.zeros((128, 128), bool)
    expected[50:75, 50:75] = True
    assert np.array_equal(mask, expected)
    blue = item["image"][2].numpy()
    far = np.ones((128, 128), bool)
    far[45:80, 45:80] = False  # the bilinear resize blurs the edge by a pixel or two
    assert (blue[mask] > 150).all() and (blue[far] == 0).all()
    tiled = open_store(prepare_store("cityscapes", root, tmp_path / "cache", patch_size=128,
                                     fit="tile", options={"classes": ["car"]}))
    # Rows 100-150 and columns 200-300 touch four of the eight 128x128 tiles.
    assert {(s["y"], s["x"]) for s in tiled.index["samples"]} == {
        (0, 128), (0, 256), (128, 128), (128, 256)}
    for sample, mask in zip(tiled.index["samples"], np.load(tiled.path / "masks.npy"), strict=False):
        y, x = sample["y"], sample["x"]
        assert np.array_equal(mask, labels[y:y + 128, x:x + 128] == CAR)


def test_classes_use_cityscapesscripts_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'tree' is not a Cityscapes label name") as info:
        DATASETS["cityscapes"](tmp_path, classes=["tree", "car"])
    assert "vegetation" in str(info.value) and "person" in str(info.value)
    with pytest.raises(ConfigError, match="twice"):
        DATASETS["cityscapes"](tmp_path, classes=["car", "car"])


def test_non_label_ids_and_missing_partners_are_reported(scenes: Path, tmp_path: Path) -> None:
    root = tmp_path / "cs"
    synth_cityscapes(root, train=2, val=1)
    label = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    values = np.asarray(Image.open(label)).copy()
    values[0, 0] = 200
    Image.fromarray(values).save(label)
    orphan = root / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
    (root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError) as info:
        check_dataset("cityscapes", root)
    problems = info.value.problems
    assert any(p.startswith(f"{label}: label values [200]") for p in problems)
    assert any(p.startswith(f"{orphan}: no mask; expected") and "_gtFine_labelIds.png" in p
               for p in problems)


def test_hash_is_stable_across_regeneration(scenes: Path, tmp_path: Path) -> None:
    again = synth_cityscapes(tmp_path / "again", train=4, val=2)
    first = open_store(prepare_store("cityscapes", scenes, tmp_path / "a", patch_size=64))
    second = open_store(prepare_store("cityscapes", again, tmp_path / "b", patch_size=64))
    assert first.hash == second.hash
    first.verify()
