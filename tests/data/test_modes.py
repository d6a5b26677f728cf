"""Files as microscopes and annotation tools write them: 16-bit and float TIFFs (tifffile),
multi-channel stacks, instance label maps (uint16, uint32) with touching objects and class
label maps, read under ``dataset.intensity``, ``channel`` and ``masks``; each mis-set mode
named in its error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segtune.cache import CachedSplit
from segtune.config import DatasetConfig, validate
from segtune.data import DataProblems, check_dataset, dataset_options, open_store, prepare_store
from segtune.data.lucchi_em import load_split
from segtune.data.modes import read_options
from segtune.data.readers import read_image
from segtune.errors import ConfigError, DataError
from segtune.loaders import PromptCollate
from segtune.prompts import PromptOptions, k_points

#: 0..4095 over a 64x64 image, row by row: its percentiles are known exactly.
RAMP = np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _touching(dtype: type = np.uint16, base: int = 1) -> np.ndarray:
    """Four objects in a 64x64 label map: three touching squares in the top-left 32x32
    tile (the third crossing into the tile below) and one alone in the bottom-right tile."""
    labels = np.zeros((64, 64), dtype)
    labels[4:20, 4:16] = base        # touches the next two
    labels[4:20, 16:28] = base + 1
    labels[20:40, 4:28] = base + 2   # crosses into the tile at y=32
    labels[40:60, 40:60] = base + 3
    return labels


def _folder(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray],
            **imwrite: object) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, pixels in images.items():
        tifffile.imwrite(root / "images" / f"{stem}.tif", pixels, **imwrite)
    for stem, labels in masks.items():
        tifffile.imwrite(root / "masks" / f"{stem}.tif", labels)
    return root


def _microscopy(root: Path) -> Path:
    """16-bit and float images with uint16 and uint32 instance maps, as Cellpose writes them."""
    return _folder(root, {"a": RAMP, "b": RAMP[::-1].copy(), "c": RAMP.astype(np.float32) / 4096},
                   {"a": _touching(), "b": _touching(np.uint32, 70_000), "c": _touching()})


def _problems(root: Path, **options: object) -> list[str]:
    with pytest.raises(DataProblems) as info:
        check_dataset("folder", root, patch_size=32, options=options)
    return info.value.problems


@pytest.mark.parametrize(("intensity", "expected"), [
    ("minmax", np.rint(RAMP / 4095 * 255)),
    ({"percentile": [1, 99]}, np.clip(np.rint((RAMP - 40.95) / (4054.05 - 40.95) * 255), 0, 255)),
    ({"window": [0, 4095]}, np.rint(RAMP / 4095 * 255)),
    ({"window": [1000, 2000]}, np.clip(np.rint((RAMP - 1000.0) / 1000 * 255), 0, 255)),
])
def test_16_bit_values_map_linearly_to_8_bit(tmp_path: Path, intensity: object,
                                             expected: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "ramp.tif", RAMP)
    got = read_image(tmp_path / "ramp.tif", 1, read_options(intensity))
    assert got.dtype == np.uint8 and np.array_equal(got, expected.astype(np.uint8))


def test_a_float_image_through_a_window(tmp_path: Path) -> None:
    pixels = RAMP.astype(np.float32) / 4095 - 0.5  # -0.5 .. 0.5
    tifffile.imwrite(tmp_path / "f.tif", pixels)
    got = read_image(tmp_path / "f.tif", 3, read_options({"window": [-0.5, 0.5]}))
    assert got.shape == (64, 64, 3) and got[0, 0, 0] == 0 and got[-1, -1, 2] == 255
    assert np.array_equal(got[..., 1], np.rint((pixels + 0.5) * 255).astype(np.uint8))


def test_wide_images_under_auto_name_the_file_and_the_options(tmp_path: Path) -> None:
    root = _microscopy(tmp_path)
    problems = _problems(root, masks="instances")
    assert len(problems) == 3
    for problem in problems:
        assert problem.startswith(str(root / "images"))
        assert "dataset.intensity" in problem and "minmax" in problem and "percentile" in problem
    assert any("float32 pixels" in p for p in problems) and any("uint16 pixels" in p for p in problems)


def test_microscopy_folder_prepares_with_instances(tmp_path: Path) -> None:
    root = _microscopy(tmp_path / "raw")
    store = open_store(prepare_store("folder", root, tmp_path / "cache", patch_size=32,
                                     val_fraction=0.0, drop_empty=False,
                                     options={"intensity": "minmax", "masks": "instances"}))
    masks = np.load(store.path / "masks.npy")
    instances = np.load(store.path / "instances.npy")
    assert instances.dtype == np.uint16 and instances.shape == masks.shape == (12, 32, 32)
    assert np.array_equal(masks, (instances > 0).astype(np.uint8))
    by_tile = {(0, 0): 3, (0, 32): 0, (32, 0): 1, (32, 32): 1}
    for sample, objects in zip(store.index["samples"], instances, strict=True):
        n = by_tile[sample["y"], sample["x"]]
        assert sample["instances"] == n
        assert sorted(set(np.unique(objects).tolist()) - {0}) == list(range(1, n + 1))
    counts = store.index["counts"]["instances"]
    assert counts["train"] + counts["test"] == 3 * 5 and counts["max_per_sample"] == 3
    assert "instances: train" in store.summary() and store.info()["instances"] == counts
    # minmax per image: the ramp's first tile, and the float image's too.
    images = np.load(store.path / "images.npy")[..., 0]
    first = {s["source"]: s["image"] for s in store.index["samples"] if (s["y"], s["x"]) == (0, 0)}
    ramp = np.rint(RAMP[:32, :32] / 4095 * 255).astype(np.uint8)
    assert np.array_equal(images[first["images/a.tif"]], ramp)
    assert np.array_equal(images[first["images/c.tif"]], ramp)


def test_instance_maps_under_binary_masks_get_the_hint(tmp_path: Path) -> None:
    root = _microscopy(tmp_path)
    problems = _problems(root, intensity="minmax")
    assert len(problems) == 3
    uint16 = next(p for p in problems if p.startswith(str(root / "masks" / "a.tif")))
    assert "mask values [0, 1, 2, 3, 4]" in uint16
    assert "look like instance labels (1..4, 4 values, touching objects)" in uint16
    assert "set dataset.masks: instances" in uint16
    uint32 = next(p for p in problems if p.startswith(str(root / "masks" / "b.tif")))
    assert "uint32 labels in [0, 70003]" in uint32 and "dataset.masks: instances" in uint32


def test_a_jpeg_mask_is_told_apart_from_a_label_map(tmp_path: Path) -> None:
    square = np.zeros((64, 64), np.uint8)
    square[10:50, 13:47] = 255
    root = _folder(tmp_path, {"a": RAMP.astype(np.uint8), "b": RAMP.astype(np.uint8)},
                   {"b": square})
    Image.fromarray(square).save(root / "masks" / "a.jpg", quality=60)
    (problem,) = _problems(root)
    assert problem.startswith(str(root / "masks" / "a.jpg"))
    assert "resized or JPEG-compressed binary mask" in problem and "instance" not in problem


def test_class_label_maps_pick_the_listed_values(tmp_path: Path) -> None:
    classes = np.zeros((64, 64), np.uint8)
    classes[:32], classes[32:, :32] = 1, 2
    root = _folder(tmp_path / "raw", {"a": RAMP, "b": RAMP}, {"a": classes, "b": classes})
    store = open_store(prepare_store("folder", root, tmp_path / "cache", patch_size=32,
                                     drop_empty=False, val_fraction=0.0,
                                     options={"intensity": {"window": [0, 4095]},
                                              "masks": {"labels": [2]}}))
    by_tile = {(s["y"], s["x"]): i for i, s in enumerate(store.index["samples"])
               if s["source"] == "images/a.tif"}
    masks = np.load(store.path / "masks.npy")
    assert masks[by_tile[32, 0]].all() and not masks[by_tile[0, 0]].any()
    assert not (store.path / "instances.npy").exists() and "instances" not in store.info()
    problems = _problems(root, intensity="minmax", masks={"labels": [2, 9]})
    assert problems == [f"{root}: dataset.masks lists the label value [9], which no mask holds; "
                        f"the masks hold [0, 1, 2]. Expected {{labels: [v, ...]}} to list values "
                        f"of the label maps."]


def test_multi_channel_tiffs_need_a_channel(tmp_path: Path) -> None:
    stack = np.stack([RAMP, RAMP // 2, np.full_like(RAMP, 2000)])  # C, Y, X as Fiji saves it
    root = _folder(tmp_path / "raw", {"a": stack, "b": stack},
                   {"a": _touching(), "b": _touching()}, imagej=True, metadata={"axes": "CYX"})
    problems = _problems(root, intensity="minmax", masks="instances")
    problem = next(p for p in problems if p.startswith(str(root / "images" / "a.tif")))
    assert len(problems) == 2 and "shape (64, 64, 3), axes YXC, uint16: 3 channels or pages" in problem
    assert "set dataset.channel to the one to read (0 to 2)" in problem
    problem = _problems(root, intensity="minmax", masks="instances", channel=3)[0]
    assert "dataset.channel is 3 but the image has 3 channels" in problem
    got = read_image(root / "images" / "a.tif", 1, read_options({"window": [0, 4095]}, channel=2))
    assert (got == round(2000 * 255 / 4095)).all()
    store = open_store(prepare_store("folder", root, tmp_path / "cache", patch_size=32,
                                     options={"intensity": "minmax", "channel": 1,
                                              "masks": "instances"}))
    assert store.channels == 1 and store.info()["options"]["channel"] == 1


def test_multi_page_tiff_pages_are_channels(tmp_path: Path) -> None:
    pages = np.stack([RAMP, RAMP[::-1, ::-1]])
    tifffile.imwrite(tmp_path / "p.tif", pages)  # two plain pages, as many cameras write
    with pytest.raises(DataError, match="2 channels or pages"):
        read_image(tmp_path / "p.tif", 1, read_options("minmax"))
    got = read_image(tmp_path / "p.tif", 1, read_options({"window": [0, 4095]}, channel=1))
    assert got[0, 0] == 255 and got[-1, -1] == 0


def test_em_stacks_map_intensities_per_slice_and_keep_instances(tmp_path: Path) -> None:
    images = np.stack([RAMP, RAMP // 4])  # the second slice is darker: its own min and max
    labels = np.stack([_touching(), _touching()])
    for split in ("training", "testing"):
        tifffile.imwrite(tmp_path / f"{split}.tif", images)
        tifffile.imwrite(tmp_path / f"{split}_groundtruth.tif", labels)
    with pytest.raises(DataProblems) as info:
        load_split(tmp_path, "train")
    assert str(tmp_path / "training.tif") in info.value.problems[0]
    assert "dataset.intensity" in info.value.problems[0]
    assert "instance labels" in info.value.problems[1]
    got = load_split(tmp_path, "train", read_options("minmax", "instances"))
    assert [(int(s.min()), int(s.max())) for s in got.images] == [(0, 255), (0, 255)]
    assert np.array_equal(got.instances, labels) and np.array_equal(got.masks, labels > 0)
    store = open_store(prepare_store("lucchi_em", tmp_path, tmp_path / "cache", patch_size=32,
                                     options={"intensity": "minmax", "masks": "instances"}))
    assert store.index["counts"]["instances"]["max_per_sample"] == 3


def test_lucchi_pp_slice_folders_read_16_bit_slices(tmp_path: Path) -> None:
    for folder, pages in (("Train_In", [RAMP, RAMP]), ("Train_Out", [_touching()] * 2),
                          ("Test_In", [RAMP]), ("Test_Out", [_touching()])):
        (tmp_path / folder).mkdir()
        for i, page in enumerate(pages):
            tifffile.imwrite(tmp_path / folder / f"slice{i}.tif", page)
    got = load_split(tmp_path, "train", read_options({"percentile": [1, 99]}, {"labels": [3]}))
    assert got.images.dtype == np.uint8 and got.images.shape == (2, 64, 64)
    assert got.images[0, 0, 0] == 0 and got.images[0, -1, -1] == 255
    assert np.array_equal(got.masks[0], (_touching() == 3).astype(np.uint8))
    assert got.values == frozenset({0, 1, 2, 3, 4}) and got.instances is None


def test_k_points_places_one_point_in_each_touching_instance(tmp_path: Path) -> None:
    root = _folder(tmp_path / "raw", {"a": RAMP, "b": RAMP}, {"a": _touching(), "b": _touching()})
    store = open_store(prepare_store("folder", root, tmp_path / "cache", patch_size=32,
                                     val_fraction=0.0, options={"intensity": "minmax",
                                                                "masks": "instances"}))
    split = store.split("train")
    item = next(split[i] for i in range(len(split)) if int(split[i]["instances"].max()) == 3)
    assert item["instances"].shape == (1, 32, 32) and item["mask"].max() == 1
    batch = PromptCollate("k_points", 0, PromptOptions(k=3))([item])
    objects = item["instances"][0].numpy()
    hit = {int(objects[int(y), int(x)]) for x, y in batch["prompts"].points[0].tolist()}
    assert hit == {1, 2, 3}
    # Largest first; the 0/1 mask alone merges the touching objects into one component.
    sizes = {v: int((objects == v).sum()) for v in (1, 2, 3)}
    first = k_points(objects, np.random.default_rng(0), PromptOptions(k=1, instances=True))
    x, y = first.points[0].astype(int)
    assert sizes[int(objects[y, x])] == max(sizes.values())
    merged = k_points(objects > 0, np.random.default_rng(0), PromptOptions(k=3))
    assert len({int(objects[int(y), int(x)]) for x, y in merged.points}) <= 3
    # The embedding-cache wrapper keeps the instance map.
    np.save(tmp_path / "emb.npy", np.zeros((store.index["counts"]["images"], 4), np.float16))
    cached = CachedSplit(split, tmp_path / "emb.npy")[0]
    assert "instances" in cached and cached["embedding"].shape == (4,)


def test_the_store_key_follows_intensity_and_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path / "raw", {"a": RAMP, "b": RAMP}, {"a": _touching(), "b": _touching()})
    paths = {prepare_store("folder", root, tmp_path / "cache", patch_size=32, options=options)
             for options in ({"intensity": "minmax", "masks": "instances"},
                             {"intensity": "minmax", "masks": {"labels": [1, 2, 3, 4]}},
                             {"intensity": {"percentile": [1, 99]}, "masks": "instances"},
                             {"intensity": {"window": [0, 4095]}, "masks": "instances"})}
    assert len(paths) == 4
    assert len({open_store(p).hash for p in paths}) == 4
    # Spelling out the defaults keeps the key of a store prepared before these settings.
    config = DatasetConfig(name="folder", root=str(root), intensity="auto", masks="binary")
    assert dataset_options(config) == {}


def _experiment(**dataset: object) -> dict:
    return {"name": "x", "dataset": {"name": "folder", "root": "data", **dataset},
            "model": {"name": "sam", "variant": "tiny"}}


@pytest.mark.parametrize(("field", "value", "named"), [
    ("intensity", "percentile", "{percentile: [low, high]}"),
    ("intensity", {"percentile": [5, 200]}, "0 <= low < high <= 100"),
    ("intensity", {"window": [10, 10]}, "{window: [low, high]}"),
    ("intensity", {"minmax": True, "window": [0, 1]}, "minmax (per image)"),
    ("masks", "instance", "instances (an instance label map"),
    ("masks", {"labels": []}, "{labels: [v, ...]}"),
    ("masks", {"labels": [1, -1]}, "distinct integers >= 0"),
    ("channel", -1, "greater than or equal to 0"),
])
def test_bad_settings_fail_when_the_file_loads(field: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(_experiment(**{field: value}), "exp.yaml")
    message = str(info.value)
    assert message.startswith("exp.yaml: invalid experiment file — ")
    assert f"dataset.{field}: " in message and named in message


def test_good_settings_load_in_their_yaml_shapes() -> None:
    cfg = validate(_experiment(intensity={"percentile": [1, 99.8]}, masks="instances", channel=0))
    assert cfg.dataset.intensity == {"percentile": [1.0, 99.8]}
    assert dataset_options(cfg.dataset) == {"intensity": {"percentile": [1.0, 99.8]},
                                            "masks": "instances", "channel": 0}


def test_cityscapes_refuses_masks_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_dataset("synthetic_cityscapes", tmp_path / "cs", options={"masks": "instances"})
    message = str(info.value)
    assert message.startswith("dataset.masks: the synthetic_cityscapes dataset has no option masks")
    assert "dataset.classes" in message and "intensity, channel" in message


def test_the_scan_shows_counts_as_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTUNE_PROGRESS_EVERY", "0")
    root = _folder(tmp_path, {s: RAMP for s in "abcde"}, {s: _touching() for s in "abcde"})
    lines: list[str] = []
    check_dataset("folder", root, patch_size=32, progress=lines.append,
                  options={"intensity": "minmax", "masks": "instances"})
    assert "folder train: 1/4 files (25%)" in "\n".join(lines)
    assert any(line.startswith("folder train: done, 4 files in ") for line in lines)
    assert any(line.startswith("folder test: 1/1 files (100%)") for line in lines)


def test_data_check_says_which_mode_a_folder_looks_like(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from segtune.data_cli import data_app

    root = _microscopy(tmp_path)
    runner = CliRunner()
    failed = runner.invoke(data_app, ["check", "folder", str(root), "--patch-size", "32",
                                      "--set", "intensity=minmax"])
    assert failed.exit_code == 1 and "set dataset.masks: instances" in failed.stderr
    passed = runner.invoke(data_app, ["check", "folder", str(root), "--patch-size", "32",
                                      "--set", "intensity={percentile: [1, 99.8]}",
                                      "--set", "masks=instances"])
    assert passed.exit_code == 0, passed.stderr
    assert "; instances: train " in passed.stdout.splitlines()[-1]
