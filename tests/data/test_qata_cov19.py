"""QaTa-COV19: Train Set/Test Set with Images/x.png and Ground-truths/mask_x.png, LViT
descriptions as text prompts, whole X-rays resized to the patch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from openpyxl import Workbook, load_workbook
from PIL import Image

from segtune.data import check_dataset, open_store, prepare_store, synth_qata
from segtune.errors import DataError

SHEETS = ["Train_text.xlsx", "Test_text.xlsx"]


@pytest.fixture(scope="module")
def qata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_qata(tmp_path_factory.mktemp("qata"), train=5, test=3)


def _sheet(path: Path) -> dict[str, str]:
    rows = list(load_workbook(path).active.iter_rows(values_only=True))
    assert rows[0] == ("Image", "Description")
    return {image: text for image, text in rows[1:]}


def test_twin_writes_the_release_layout_and_lvit_sheets(qata: Path) -> None:
    assert sorted(p.name for p in (qata / "Train Set" / "Images").iterdir()) == [
        f"covid_{i}.png" for i in range(1, 6)]
    assert sorted(p.name for p in (qata / "Test Set" / "Ground-truths").iterdir()) == [
        f"mask_covid_{i}.png" for i in range(6, 9)]
    image = Image.open(qata / "Train Set/Images/covid_1.png")
    mask = np.asarray(Image.open(qata / "Train Set/Ground-truths/mask_covid_1.png"))
    assert image.mode == "L" and image.size == (224, 224) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 255}
    texts = _sheet(qata / "Train_text.xlsx")
    assert sorted(texts) == [f"covid_{i}.png" for i in range(1, 6)]
    assert all("pulmonary infection" in text for text in texts.values())


def test_descriptions_become_the_text_of_each_sample(qata: Path, tmp_path: Path) -> None:
    store = open_store(prepare_store("qata_cov19", qata, tmp_path, patch_size=64,
                                     options={"description_file": SHEETS}))
    texts = {**_sheet(qata / SHEETS[0]), **_sheet(qata / SHEETS[1])}
    samples = store.index["samples"]
    assert len(samples) == 8 and store.channels == 1
    assert store.index["counts"]["samples"]["test"] == 3
    for sample in samples:
        assert sample["text"] == texts[Path(sample["source"]).name]
        assert sample["class"] == "infection" and (sample["y"], sample["x"]) == (0, 0)
    item = store.split("test")[0]
    assert item["image"].shape == (1, 64, 64) and item["text"] == texts["covid_6.png"]
    plain = open_store(prepare_store("qata_cov19", qata, tmp_path, patch_size=64))
    assert {s["text"] for s in plain.index["samples"]} == {""}
    assert plain.index["params"]["fit"] == "resize"


def test_an_infection_at_a_known_place_lines_up_after_resizing(tmp_path: Path) -> None:
    for folder in ("Train Set", "Test Set"):
        (tmp_path / folder / "Images").mkdir(parents=True)
        (tmp_path / folder / "Ground-truths").mkdir(parents=True)
        image = np.full((100, 100), 50, np.uint8)
        image[20:40, 60:90] = 200
        mask = np.zeros((100, 100), np.uint8)
        mask[20:40, 60:90] = 255
        Image.fromarray(image).save(tmp_path / folder / "Images" / f"{folder[:4]}.png")
        Image.fromarray(mask).save(tmp_path / folder / "Ground-truths" / f"mask_{folder[:4]}.png")
    store = open_store(prepare_store("qata_cov19", tmp_path, tmp_path / "cache", patch_size=50,
                                     val_fraction=0.0))
    item = store.split("train")[0]
    expected = np.zeros((50, 50), bool)
    expected[10:20, 30:45] = True  # 100 -> 50: every coordinate halves
    assert np.array_equal(item["mask"][0].numpy().astype(bool), expected)
    image = item["image"][0].numpy()
    # Bilinear (antialiased) resizing blends the outermost ring; the inside keeps its value.
    assert (image[11:19, 31:44] == 200).all() and (image[expected] > 150).all()
    far = np.ones((50, 50), bool)
    far[8:22, 28:47] = False
    assert (image[far] == 50).all()


def test_an_image_without_a_description_is_a_problem(qata: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        check_dataset("qata_cov19", qata, options={"description_file": SHEETS[0]})
    message = str(info.value)
    assert "3 test images have no row in" in message and "covid_6.png" in message
    book = Workbook()
    book.active.append(["Picture", "Caption"])
    book.save(tmp_path / "bad.xlsx")
    with pytest.raises(DataError, match="expected the columns Image and Description"):
        check_dataset("qata_cov19", qata, options={"description_file": str(tmp_path / "bad.xlsx")})


def test_masks_must_carry_the_mask_prefix(qata: Path, tmp_path: Path) -> None:
    root = synth_qata(tmp_path / "q", train=2, test=1)
    masks = root / "Test Set" / "Ground-truths"
    (masks / "mask_covid_3.png").rename(masks / "covid_3.png")
    with pytest.raises(DataError) as info:
        check_dataset("qata_cov19", root)
    problems = info.value.problems
    assert any(p.startswith(f"{masks / 'covid_3.png'}: not named mask_") for p in problems)
    assert any(p.startswith(f"{root / 'Test Set/Images/covid_3.png'}: no mask; expected "
                            f"{masks / 'mask_covid_3.png'}") for p in problems)


def test_hash_is_stable_across_regeneration(qata: Path, tmp_path: Path) -> None:
    again = synth_qata(tmp_path / "again", train=5, test=3)
    options = {"description_file": SHEETS}
    first = open_store(prepare_store("qata_cov19", qata, tmp_path / "a", options=options))
    second = open_store(prepare_store("qata_cov19", again, tmp_path / "b", options=options))
    assert first.hash == second.hash
