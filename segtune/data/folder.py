"""Any folder of images with binary masks: the layout most users' own data already has.

Source: your own data. Point ``dataset.root`` at a folder holding::

    images/<name>.png|jpg|jpeg|tif|tiff|bmp     grey or RGB; 16-bit/float with dataset.intensity
    masks/<name>.png|tif|tiff|bmp|...           same stem, same size; 0/255 or 0/1, or a label
                                                map with dataset.masks (instances, labels)

Images and masks are matched by file stem (``images/a.jpg`` with ``masks/a.png``). Masks may
be grey or black-and-white RGB; lossy JPEG masks fail the value check, which says so. If any
image is in colour the dataset is stored as RGB (grey images repeated to three channels),
otherwise as grey. Multi-page and multi-channel TIFFs need ``dataset.channel`` (the page or
channel to read, from 0); ``intensity``, ``masks`` and ``channel`` are described in
:mod:`segtune.data.modes`.

There is no given split, so the images are split deterministically: the sorted stems are
shuffled with ``split_seed`` (default 0) and ``test_fraction`` (default 0.2) of them form
``test``; the rest give ``train`` and ``val``.

Getting to ``patch_size`` (``fit``): ``tile`` by default — non-overlapping tiles, remainders
dropped, tiles without foreground dropped when ``drop_empty`` is true; images smaller than a
tile give none, so use ``fit: resize`` (each whole image resized to a square) for small
images. Every sample has the class ``foreground`` and no text.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from segtune.data.modes import ReadOptions, read_options
from segtune.data.raw import RawDataset, RawItem
from segtune.data.readers import (
    image_files,
    is_colour,
    missing_folder,
    pair_up,
    read_pair,
    split_by_seed,
)

CLASS = "foreground"
IMAGES, MASKS = "images", "masks"


def build(root: Path, *, test_fraction: float = 0.2, split_seed: int = 0,
          intensity: Any = "auto", masks: Any = "binary", channel: int | None = None
          ) -> RawDataset:
    """Registry builder: pair ``images/`` and ``masks/`` by stem and split by seed."""
    root = Path(root)
    reading = read_options(intensity, masks, channel)
    problems: list[str] = []
    by_stem: dict[str, dict[str, Path]] = {}
    for folder in (IMAGES, MASKS):
        if not (root / folder).is_dir():
            problems.append(missing_folder(root / folder, folder, f"Point dataset.root at the "
                                           f"folder that holds {IMAGES}/ and {MASKS}/."))
            by_stem[folder] = {}
            continue
        found: dict[str, Path] = {}
        for path in image_files(root / folder):
            if path.stem in found:
                problems.append(f"{path}: another file has the stem {path.stem!r} "
                                f"({found[path.stem].name}); expected one file per stem in "
                                f"{root / folder}.")
            else:
                found[path.stem] = path
        by_stem[folder] = found
    images, masks = by_stem[IMAGES], by_stem[MASKS]
    pairs, missing = pair_up(images, masks,
                             lambda key: root / MASKS / f"{key}.png",
                             lambda key: root / IMAGES / f"{key}.png")
    problems += missing
    test = split_by_seed([str(key) for key, _, _ in pairs], test_fraction, split_seed) \
        if pairs else set()
    entries = {"train": tuple((i, m) for key, i, m in pairs if key not in test),
               "test": tuple((i, m) for key, i, m in pairs if key in test)}
    channels = 3 if any(is_colour(image, reading) for _, image, _ in pairs) else 1
    files = tuple(path for _, image, mask in pairs for path in (image, mask))
    return RawDataset(root=root, files=files, entries=entries,
                      read=partial(_read, root, channels, reading), channels=channels,
                      fit="tile", classes=(CLASS,), problems=tuple(problems), reading=reading)


def _read(root: Path, channels: int, reading: ReadOptions,
          entry: tuple[Path, Path]) -> list[RawItem]:
    image_path, mask_path = entry
    image, target = read_pair(image_path, mask_path, channels, CLASS, reading=reading)
    return [RawItem(image=image, targets=(target,),
                    source=image_path.relative_to(root).as_posix())]
