"""Corsican Fire Database: wildfire photographs with hand-made fire masks (Toulouse et al.).

Source: https://cfdb.univ-corse.fr/ (free registration; the visible-range images and their
ground truths). T. Toulouse, L. Rossi, A. Campana, T. Celik, M. A. Akhloufi, "Computer vision
for wildfire research: An evolving image dataset for processing and analysis", Fire Safety
Journal 92, 2017.

Point ``dataset.root`` at the unzipped database. Every image ``NNN_rgb.png`` anywhere under it
is paired with the mask ``NNN_gt.png`` in the same folder (near-infrared ``*_nir.png`` and
other files are ignored). Masks may be grey or RGB; fire is white (255, or 1), the rest
black. Image sizes vary (many are 1024x768).

The database has no split, so the images are split deterministically: the sorted image paths
are shuffled with ``split_seed`` (default 0) and ``test_fraction`` (default 0.2) of them
form ``test``; the rest give ``train`` and ``val``. Splitting by image, not by tile, keeps
tiles of one photograph out of both train and test.

Getting to ``patch_size`` (``fit``): ``tile`` by default, as the thesis did — non-overlapping
256x256 tiles (12 per 1024x768 image), the right and bottom remainders dropped, tiles
without fire dropped when ``drop_empty`` is true. ``fit: resize`` resizes each whole image to
a square instead. Every sample has the class ``fire`` and no text (the thesis's CLIPSeg text
"fire" is ``prompt.text``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from segtune.data.modes import ReadOptions, read_options
from segtune.data.raw import RawDataset, RawItem
from segtune.data.readers import pair_up, read_pair, split_by_seed

CLASS = "fire"
IMAGE_SUFFIX, MASK_SUFFIX = "_rgb.png", "_gt.png"


def build(root: Path, *, test_fraction: float = 0.2, split_seed: int = 0,
          intensity: Any = "auto", masks: Any = "binary", channel: int | None = None
          ) -> RawDataset:
    """Registry builder: find every ``NNN_rgb.png``/``NNN_gt.png`` pair under ``root``."""
    root = Path(root)
    reading = read_options(intensity, masks, channel)
    problems: list[str] = []
    if not root.is_dir():
        problems.append(f"{root}: no such folder; expected the Corsican Fire Database with "
                        f"NNN_rgb.png images and NNN_gt.png masks somewhere under it.")
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
    else:
        # Key: the path relative to the root without the suffix, e.g. "seq1/042".
        images = {_key(root, p, IMAGE_SUFFIX): p for p in root.rglob(f"*{IMAGE_SUFFIX}")
                  if p.is_file()}
        masks = {_key(root, p, MASK_SUFFIX): p for p in root.rglob(f"*{MASK_SUFFIX}")
                 if p.is_file()}
        if not images and not masks:
            problems.append(f"{root}: no *{IMAGE_SUFFIX} images and no *{MASK_SUFFIX} masks "
                            f"found in it or its subfolders; expected the Corsican Fire "
                            f"Database layout (e.g. 001_rgb.png with 001_gt.png).")
    pairs, missing = pair_up(images, masks,
                             lambda key: root / f"{key}{MASK_SUFFIX}",
                             lambda key: root / f"{key}{IMAGE_SUFFIX}")
    problems += missing
    test = split_by_seed([str(key) for key, _, _ in pairs], test_fraction, split_seed) \
        if pairs else set()
    entries = {"train": tuple((i, m) for key, i, m in pairs if key not in test),
               "test": tuple((i, m) for key, i, m in pairs if key in test)}
    files = tuple(path for _, image, mask in pairs for path in (image, mask))
    return RawDataset(root=root, files=files, entries=entries,
                      read=partial(_read, root, reading), channels=3, fit="tile",
                      classes=(CLASS,), problems=tuple(problems), reading=reading)


def _key(root: Path, path: Path, suffix: str) -> str:
    return path.relative_to(root).as_posix()[:-len(suffix)]


def _read(root: Path, reading: ReadOptions, entry: tuple[Path, Path]) -> list[RawItem]:
    image_path, mask_path = entry
    image, target = read_pair(image_path, mask_path, 3, CLASS, reading=reading)
    return [RawItem(image=image, targets=(target,),
                    source=image_path.relative_to(root).as_posix())]
