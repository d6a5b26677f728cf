"""The prepared store: tile counts, splits, hashes, reuse, atomic writes, torch Datasets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader

from segtune.data import DATASETS, RawDataset, RawItem, Target, open_store, prepare_store, synth_em
from segtune.data import lucchi_em as lucchi_module
from segtune.errors import ConfigError, DataError

SLICES, SIDE = 2, 512


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_em(tmp_path_factory.mktemp("raw"), slices=SLICES, height=SIDE, width=SIDE)


def _nonempty_tiles(raw: Path, name: str, size: int) -> int:
    masks = tifffile.imread(raw / name)
    n = SIDE // size
    tiles = masks[:, : n * size, : n * size].reshape(SLICES, n, size, n, size)
    return int(tiles.any(axis=(2, 4)).sum())


def test_registry_has_the_em_datasets() -> None:
    assert {"lucchi_em", "synthetic_em"} <= set(DATASETS)


def test_counts_match_the_tiles_with_foreground(raw: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("synthetic_em", raw, tmp_path, patch_size=128))
    total = SLICES * (SIDE // 128) ** 2
    kept_train = _nonempty_tiles(raw, "training_groundtruth.tif", 128)
    kept_test = _nonempty_tiles(raw, "testing_groundtruth.tif", 128)
    counts = store.index["counts"]
    assert counts["dropped_empty"] == {"train": total - kept_train, "test": total - kept_test}
    assert counts["samples"]["train"] + counts["samples"]["val"] == kept_train
    assert counts["samples"]["val"] == round(0.2 * kept_train)
    assert counts["samples"]["test"] == kept_test
    images = np.load(store.path / "images.npy")
    masks = np.load(store.path / "masks.npy")
    assert images.shape == (kept_train + kept_test, 128, 128, 1)
    assert masks.shape == (kept_train + kept_test, 128, 128)
    assert images.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks).tolist()) == {0, 1} and masks.any(axis=(1, 2)).all()
    assert "128x128" in store.summary() and str(counts["samples"]["val"]) in store.summary()


def test_patches_are_the_raw_pixels_at_the_recorded_position(raw: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("synthetic_em", raw, tmp_path, patch_size=200,
                                     drop_empty=False))
    # 512 = 2 * 200 + 112: the border remainder is dropped, nothing is padded.
    assert store.index["counts"]["samples"]["test"] == SLICES * 4
    assert store.index["counts"]["dropped_empty"] == {"train": 0, "test": 0}
    stacks = {"training.tif": tifffile.imread(raw / "training.tif"),
              "testing.tif": tifffile.imread(raw / "testing.tif")}
    images = np.load(store.path / "images.npy")
    for i, sample in enumerate(store.index["samples"]):
        s, y, x = sample["slice"], sample["y"], sample["x"]
        assert sample["image"] == i  # one target per tile: one image row per sample
        assert np.array_equal(images[i, ..., 0],
                              stacks[sample["source"]][s, y:y + 200, x:x + 200])
    assert {(s["y"], s["x"]) for s in store.index["samples"]} == {(0, 0), (0, 200), (200, 0),
                                                                  (200, 200)}


def test_splits_are_disjoint_and_deterministic(raw: Path, tmp_path: Path) -> None:
    first = open_store(prepare_store("synthetic_em", raw, tmp_path / "a", patch_size=128))
    again = open_store(prepare_store("synthetic_em", raw, tmp_path / "b", patch_size=128))
    other = open_store(prepare_store("synthetic_em", raw, tmp_path / "c", patch_size=128,
                                     seed=1))
    splits = {name: set(ids) for name, ids in first.index["splits"].items()}
    assert not splits["train"] & splits["val"] and not splits["val"] & splits["test"]
    assert len(set().union(*splits.values())) == len(first.index["samples"])
    for name, ids in splits.items():
        assert {first.index["samples"][i]["split"] for i in ids} == {name}
    assert first.index["splits"] == again.index["splits"]
    assert first.hash == again.hash  # the content hash ignores where and when it was built
    assert other.index["splits"]["val"] != first.index["splits"]["val"]
    assert other.index["splits"]["test"] == first.index["splits"]["test"]


def test_changed_parameters_make_a_new_store_with_a_new_hash(raw: Path, tmp_path: Path) -> None:
    small = prepare_store("synthetic_em", raw, tmp_path, patch_size=128)
    large = prepare_store("synthetic_em", raw, tmp_path, patch_size=256)
    assert small != large and small.name.startswith("synthetic_em-")
    assert open_store(small).hash != open_store(large).hash
    assert open_store(large).patch_size == 256


def test_same_inputs_reuse_the_store_without_reading(raw: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    path = prepare_store("synthetic_em", raw, tmp_path, patch_size=256, progress=lines.append)
    assert any("reading the train split of synthetic_em" in line for line in lines)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the raw stacks were decoded again")

    monkeypatch.setattr(lucchi_module, "load_split", refuse)
    lines.clear()
    assert prepare_store("synthetic_em", raw, tmp_path, patch_size=256,
                         progress=lines.append) == path
    assert lines == [f"reusing prepared store {path}", open_store(path).summary()]


def test_failed_prepare_leaves_no_partial_store(raw: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = lucchi_module.load_split

    def fail_on_test(root: Path, split: str, *args: object):
        calls["n"] += 1
        if split == "test":
            raise KeyboardInterrupt  # like a user pressing Ctrl-C half way
        return real(root, split, *args)

    monkeypatch.setattr(lucchi_module, "load_split", fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        prepare_store("synthetic_em", raw, tmp_path / "cache", patch_size=256)
    assert calls["n"] == 2
    assert list((tmp_path / "cache").iterdir()) == []


def test_split_datasets_yield_torch_samples(raw: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("synthetic_em", raw, tmp_path, patch_size=128))
    train = store.split("train")
    item = train[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 128, 128)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 128, 128)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["index"] == store.index["splits"]["train"][0]
    assert item["text"] == ""  # EM samples carry no text prompt
    item["image"][0, 0, 0] = 7  # a copy: writable, and the store is untouched
    assert len(train) == store.index["counts"]["samples"]["train"]

    quick = train.subset(3)
    assert len(quick) == 3 and [quick[i]["index"] for i in range(3)] == \
        store.index["splits"]["train"][:3]
    assert len(train.subset(10_000)) == len(train)

    clone = pickle.loads(pickle.dumps(train))  # what DataLoader workers and Ray receive
    assert torch.equal(clone[1]["image"], train[1]["image"])
    batch = next(iter(DataLoader(store.split("val"), batch_size=2)))
    assert batch["image"].shape == (2, 1, 128, 128)
    with pytest.raises(DataError, match="no split 'dev'"):
        store.split("dev")


def test_open_store_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        open_store(tmp_path)
    assert str(tmp_path) in str(info.value) and "index.json" in str(info.value)


def test_damaged_store_is_detected(raw: Path, tmp_path: Path) -> None:
    path = prepare_store("synthetic_em", raw, tmp_path, patch_size=256)
    masks = np.load(path / "masks.npy", mmap_mode="r+")
    masks[0, 0, 0] ^= 1
    masks.flush()
    del masks
    with pytest.raises(DataError, match="hash"):
        open_store(path).verify()
    index = json.loads((path / "index.json").read_text())
    index["samples"].pop()
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=str(path)):
        open_store(path)


def test_unknown_dataset_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synthetic_em"):
        prepare_store("cityscapes_typo", tmp_path, tmp_path)


def test_lucchi_em_store_from_real_layout_files(raw: Path, tmp_path: Path) -> None:
    # The same files under the real dataset's name give the same patches.
    real = open_store(prepare_store("lucchi_em", raw, tmp_path, patch_size=256))
    synthetic = open_store(prepare_store("synthetic_em", raw, tmp_path, patch_size=256))
    assert real.dataset == "lucchi_em" and real.path != synthetic.path
    assert np.array_equal(np.load(real.path / "images.npy"),
                          np.load(synthetic.path / "images.npy"))


def _scene(seed: int, height: int = 64, width: int = 96) -> RawItem:
    """An RGB item with two targets: "left" (a bar at x < 20) and "dot" (only on odd seeds)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    left = np.zeros((height, width), np.uint8)
    left[:, :20] = 1
    targets = [Target("left", "a bar on the left", left)]
    if seed % 2:
        dot = np.zeros((height, width), np.uint8)
        dot[5:9, 40:44] = 1
        targets.append(Target("dot", "a small dot", dot))
    return RawItem(image=image, targets=tuple(targets), source=f"scene{seed}.png")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> str:
    """A registered in-memory RGB dataset: 6 train scenes, 2 test scenes, options recorded."""
    def build(root: Path, *, flavour: str = "plain") -> RawDataset:
        entries = {"train": tuple(range(6)), "test": (6, 7)}
        return RawDataset(root=root, files=(), entries=entries, read=lambda seed: [_scene(seed)],
                          channels=3, fit="resize", classes=("left", "dot"))

    monkeypatch.setitem(DATASETS, "fake", build)
    return "fake"


def test_rgb_targets_share_one_image_row(fake: str, tmp_path: Path) -> None:
    store = open_store(prepare_store(fake, tmp_path, tmp_path, patch_size=32, val_fraction=0.34,
                                     options={"flavour": "odd"}))
    images = np.load(store.path / "images.npy")
    masks = np.load(store.path / "masks.npy")
    samples = store.index["samples"]
    assert images.shape == (8, 32, 32, 3) and masks.shape == (12, 32, 32)
    assert store.channels == 3 and store.index["params"]["options"] == {"flavour": "odd"}
    assert store.index["counts"]["classes"] == {"dot": 4, "left": 8}
    by_row: dict[int, set[str]] = {}
    for sample in samples:
        by_row.setdefault(sample["image"], set()).add(sample["split"])
        assert sample["text"] == {"left": "a bar on the left", "dot": "a small dot"}[
            sample["class"]]
    assert all(len(splits) == 1 for splits in by_row.values())  # a patch is in one split
    val_rows = {s["image"] for s in samples if s["split"] == "val"}
    assert len(val_rows) == round(0.34 * 6)

    dataset = store.split("train")
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    sample = samples[item["index"]]
    assert torch.equal(item["image"], torch.from_numpy(images[sample["image"]]).permute(2, 0, 1))
    assert item["text"] == sample["text"]
    # The resized bar covers the left 20/96 of the width: columns 0..5 of 32 (nearest).
    left = next(dataset[i]["mask"][0] for i in range(len(dataset))
                if samples[dataset[i]["index"]]["class"] == "left")
    assert left[:, :6].all() and not left[:, 7:].any()
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and len(batch["text"]) == 3


def test_unknown_dataset_option_is_a_config_error(fake: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="flavour") as info:
        prepare_store(fake, tmp_path, tmp_path, options={"classes": ["car"]})
    assert "classes" in str(info.value)
    with pytest.raises(ConfigError, match="has no option classes; its options are intensity, "
                                          "masks, channel"):
        prepare_store("lucchi_em", tmp_path, tmp_path, options={"classes": ["car"]})


def test_stores_of_an_older_format_are_refused(raw: Path, tmp_path: Path) -> None:
    path = prepare_store("synthetic_em", raw, tmp_path, patch_size=256)
    index = json.loads((path / "index.json").read_text())
    index["format"] = 1
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="format 1"):
        open_store(path)
