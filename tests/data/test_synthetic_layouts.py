"""The synthetic twins: each `synthetic_*` entry writes its real layout into an empty root,
reads it back with the real reader, quickly, and the same seed gives the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from segtune.data import DATASETS, SYNTH, TWINS, check_dataset, synthesize

NAMES = sorted(TWINS)


def test_every_real_dataset_has_a_twin() -> None:
    assert set(TWINS.values()) == set(SYNTH) == {"cityscapes", "corsican_fire", "lucchi_em",
                                                 "qata_cov19", "folder"}
    assert set(DATASETS) == set(TWINS) | set(SYNTH)


@pytest.mark.parametrize("name", NAMES)
def test_twin_entry_writes_then_reads_the_real_layout(name: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    raw = DATASETS[name](root)
    assert raw.problems == () and raw.entries["train"] and raw.entries["test"]
    assert all(path.is_file() and path.is_relative_to(root) for path in raw.files)
    result = check_dataset(TWINS[name], root)  # the real name reads the same files
    assert result["samples"]["train"] > 0 and result["samples"]["test"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bytes(name: str, tmp_path: Path) -> None:
    for folder, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert synthesize(name, tmp_path / folder, seed) == TWINS[name]

    def contents(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.suffix != ".xlsx"}  # xlsx files embed a timestamp

    assert contents(tmp_path / "a") == contents(tmp_path / "b")
    assert contents(tmp_path / "a") != contents(tmp_path / "c")


def test_twin_entry_leaves_a_non_empty_root_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    raw = DATASETS["synthetic_folder"](tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert raw.problems  # read as the real layout, which is missing
