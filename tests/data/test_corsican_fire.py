"""Corsican Fire: NNN_rgb.png/NNN_gt.png pairs anywhere under the root, grey or RGB masks,
non-overlapping tiles, and a deterministic split by image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtune.data import DATASETS, open_store, prepare_store, synth_fire


@pytest.fixture(scope="module")
def fire(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_fire(tmp_path_factory.mktemp("fire"), images=5)


def _masks(root: Path) -> dict[str, np.ndarray]:
    """rgb image path (relative) -> its 0/1 mask, read independently of segtune."""
    out = {}
    for path in sorted(root.rglob("*_gt.png")):
        values = np.asarray(Image.open(path).convert("L"))
        out[path.relative_to(root).as_posix().replace("_gt.png", "_rgb.png")] = values // 255
    return out


def test_twin_writes_pairs_in_subfolders_with_grey_and_rgb_masks(fire: Path) -> None:
    names = sorted(p.relative_to(fire).as_posix() for p in fire.rglob("*.png"))
    assert names[:4] == ["seq1/001_gt.png", "seq1/001_rgb.png", "seq1/003_gt.png",
                         "seq1/003_rgb.png"]
    assert len(names) == 10
    assert {Image.open(fire / "seq1/001_gt.png").mode, Image.open(fire / "seq2/002_gt.png").mode} \
        == {"L", "RGB"}
    for path in fire.rglob("*_gt.png"):
        assert set(np.unique(np.asarray(Image.open(path))).tolist()) == {0, 255}
    assert Image.open(fire / "seq1/001_rgb.png").size == (512, 384)
    assert Image.open(fire / "seq2/002_rgb.png").size == (768, 512)


def test_tiles_counts_and_split_by_image(fire: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("corsican_fire", fire, tmp_path, drop_empty=False))
    masks = _masks(fire)
    tiles = {source: (m.shape[0] // 256) * (m.shape[1] // 256) for source, m in masks.items()}
    assert len(store.index["samples"]) == sum(tiles.values()) == 3 * 2 + 2 * 6
    test = {s["source"] for s in store.index["samples"] if s["split"] == "test"}
    rest = {s["source"] for s in store.index["samples"] if s["split"] != "test"}
    assert len(test) == 1 and not test & rest  # 0.2 of 5 images, no image on both sides
    kept = open_store(prepare_store("corsican_fire", fire, tmp_path))
    nonempty = sum(int(m[y:y + 256, x:x + 256].any()) for m in masks.values()
                   for y in range(0, m.shape[0] - 255, 256)
                   for x in range(0, m.shape[1] - 255, 256))
    assert len(kept.index["samples"]) == nonempty
    assert sum(kept.index["counts"]["dropped_empty"].values()) == sum(tiles.values()) - nonempty
    for sample, mask in zip(kept.index["samples"], np.load(kept.path / "masks.npy"), strict=False):
        y, x = sample["y"], sample["x"]
        assert np.array_equal(mask, masks[sample["source"]][y:y + 256, x:x + 256])
        assert sample["class"] == "fire" and sample["text"] == ""
    assert np.load(kept.path / "images.npy").shape[1:] == (256, 256, 3)


def test_split_follows_the_seed_and_fraction(fire: Path) -> None:
    build = DATASETS["corsican_fire"]
    first, again = build(fire), build(fire)
    assert first.entries == again.entries
    half = build(fire, test_fraction=0.4)
    assert len(half.entries["test"]) == 2 and len(half.entries["train"]) == 3
    seeds = {tuple(build(fire, split_seed=seed).entries["test"]) for seed in range(6)}
    assert len(seeds) > 1


def test_fire_at_a_known_place_lines_up_with_its_pixels(tmp_path: Path) -> None:
    for i, folder in ((1, "a"), (2, "b/c")):
        image = np.zeros((300, 600, 3), np.uint8)
        image[10:60, 300:350] = (255, 200, 40)
        mask = np.zeros((300, 600, 3), np.uint8)  # RGB, fire white
        mask[10:60, 300:350] = 255
        (tmp_path / "raw" / folder).mkdir(parents=True)
        Image.fromarray(image).save(tmp_path / "raw" / folder / f"00{i}_rgb.png")
        Image.fromarray(mask).save(tmp_path / "raw" / folder / f"00{i}_gt.png")
    store = open_store(prepare_store("corsican_fire", tmp_path / "raw", tmp_path / "cache"))
    assert [(s["y"], s["x"]) for s in store.index["samples"]] == [(0, 256), (0, 256)]
    item = store.split("test")[0]
    expected = np.zeros((256, 256), bool)
    expected[10:60, 44:94] = True
    assert np.array_equal(item["mask"][0].numpy().astype(bool), expected)
    assert (item["image"][:, expected].T == item["image"].new_tensor([255, 200, 40])).all()
    assert (item["image"][:, ~expected] == 0).all()


def test_hash_is_stable_across_regeneration(fire: Path, tmp_path: Path) -> None:
    again = synth_fire(tmp_path / "again", images=5)
    first = open_store(prepare_store("corsican_fire", fire, tmp_path / "a"))
    second = open_store(prepare_store("corsican_fire", again, tmp_path / "b"))
    assert first.hash == second.hash
    other = open_store(prepare_store("corsican_fire", again, tmp_path / "b",
                                     options={"split_seed": 3}))
    assert other.hash != first.hash
