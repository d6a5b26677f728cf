"""The example experiment file of each real dataset loads, names its dataset, and its dataset
section prepares the dataset's synthetic twin through the real reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from segtune.config import load_config
from segtune.data import SYNTH, check_dataset, dataset_options

FOLDER = Path(__file__).resolve().parents[2] / "experiments" / "datasets"
FILES = sorted(FOLDER.glob("*.yaml"))


def test_one_file_per_real_dataset() -> None:
    assert {path.stem for path in FILES} == set(SYNTH)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_loads_and_its_dataset_section_reads_the_twin(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.dataset.name == path.stem
    assert (cfg.model.name, cfg.model.variant) == ("sam", "vit_b")
    assert cfg.model.checkpoint == "checkpoints/sam_vit_b_01ec64.pth"
    d = cfg.dataset
    SYNTH[d.name](tmp_path)
    result = check_dataset(d.name, tmp_path, patch_size=d.patch_size, drop_empty=d.drop_empty,
                           fit=d.fit, options=dataset_options(d))
    assert result["samples"]["train"] > 0 and result["samples"]["test"] > 0


def test_overrides_reach_the_dataset_options() -> None:
    cfg = load_config(FOLDER / "cityscapes.yaml", ["dataset.classes=[car]",
                                                   "dataset.fit=tile"])
    assert dataset_options(cfg.dataset) == {"classes": ["car"]} and cfg.dataset.fit == "tile"
    cfg = load_config(FOLDER / "qata_cov19.yaml",
                      ["dataset.description_file=[Train_text.xlsx, Test_text.xlsx]"])
    assert dataset_options(cfg.dataset) == {"description_file": ["Train_text.xlsx",
                                                                 "Test_text.xlsx"]}
