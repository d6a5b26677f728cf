"""Cityscapes: urban street scenes from 50 cities with fine pixel annotations (Cordts et al.).

Source: https://www.cityscapes-dataset.com/downloads/ (free registration) —
``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``, unzipped into one folder.
M. Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016.

Point ``dataset.root`` at the folder holding ``leftImg8bit/`` and ``gtFine/``::

    leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png    2048x1024 RGB
    gtFine/{train,val}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png     label ids, 8 bit

The other gtFine files (color, instanceIds, polygons) and the ``test`` split (whose labels
are not public) are ignored. ``train`` (2975 images) gives the ``train`` and ``val`` splits,
``val`` (500 images) the ``test`` split, as in the thesis.

The ``classes`` option lists Cityscapes label names from ``cityscapesscripts``' label table
(default: the thesis's building, car, road, vegetation and person; the thesis called the last
two "tree" and "people"). Each (image, class present) pair is one sample: its mask is where
the label map holds that class's id, and its text prompt is the class name.

Getting to ``patch_size`` (``fit``): by default ``resize`` — the whole 2048x1024 image is
resized to a ``patch_size`` square (bilinear for the image, nearest neighbour for the label
map), so a sample is a whole scene as in the thesis and the aspect ratio is not kept (SAM and
CLIPSeg resize their input anyway). A class is present when its id occurs in the full-size
label map; ``drop_empty`` then drops pairs whose object vanished in the resize.
``fit: tile`` cuts 256x256 tiles (32 per image) instead, each (tile, class) a sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from cityscapesscripts.helpers.labels import labels as LABELS

from segtune.data.modes import ReadOptions, read_options
from segtune.data.raw import DataProblems, RawDataset, RawItem, Target
from segtune.data.readers import check_same_size, missing_folder, pair_up, read_image, read_labels
from segtune.errors import ConfigError, DataError

#: The thesis's five classes ("tree" is vegetation, "people" is person).
DEFAULT_CLASSES = ("building", "car", "road", "vegetation", "person")
#: Cityscapes split folder -> segtune split.
SPLITS = {"train": "train", "val": "test"}
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
# Label ids that labelIds PNGs hold (license plate has id -1 and is never written).
_LABEL_IDS = {label.name: label.id for label in LABELS if label.id >= 0}
_VALID = np.zeros(256, dtype=bool)
_VALID[list(_LABEL_IDS.values())] = True


def class_ids(classes: Sequence[str] | None) -> dict[str, int]:
    """Cityscapes label name -> label id for the chosen classes; ConfigError for unknown ones."""
    names = list(DEFAULT_CLASSES if classes is None else classes)
    if not names:
        raise ConfigError("dataset.classes is empty; list Cityscapes label names such as "
                          "building, car, road, vegetation, person.")
    unknown = [name for name in names if name not in _LABEL_IDS]
    if unknown:
        raise ConfigError(f"dataset.classes: {', '.join(map(repr, unknown))} is not a Cityscapes "
                          f"label name; the names (from cityscapesscripts) are "
                          f"{', '.join(_LABEL_IDS)}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"dataset.classes lists a class twice: {names}.")
    return {name: _LABEL_IDS[name] for name in names}


def build(root: Path, *, classes: Sequence[str] | None = None, intensity: Any = "auto",
          channel: int | None = None) -> RawDataset:
    """Registry builder: pair every image with its labelIds file, without decoding.

    There is no ``masks`` option: the masks are the label ids that ``classes`` names.
    """
    root = Path(root)
    ids = class_ids(classes)
    reading = read_options(intensity, "binary", channel)
    problems: list[str] = []
    entries: dict[str, tuple[tuple[Path, Path], ...]] = {}
    files: list[Path] = []
    for folder in ("leftImg8bit", "gtFine"):
        if not (root / folder).is_dir():
            problems.append(missing_folder(
                root / folder, "Cityscapes " + ("images" if folder == "leftImg8bit" else
                                               "fine annotations"),
                "Point dataset.root at the folder where leftImg8bit_trainvaltest.zip and "
                "gtFine_trainvaltest.zip were unzipped."))
    for folder, split in SPLITS.items():
        image_dir, label_dir = root / "leftImg8bit" / folder, root / "gtFine" / folder
        if problems:
            entries[split] = ()
            continue
        images = {p.relative_to(image_dir).as_posix()[:-len(IMAGE_SUFFIX)]: p
                  for p in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
        masks = {p.relative_to(label_dir).as_posix()[:-len(LABEL_SUFFIX)]: p
                 for p in label_dir.glob(f"*/*{LABEL_SUFFIX}")}
        pairs, missing = pair_up(images, masks,
                                 lambda key, d=label_dir: d / f"{key}{LABEL_SUFFIX}",
                                 lambda key, d=image_dir: d / f"{key}{IMAGE_SUFFIX}")
        problems += missing
        entries[split] = tuple((image, mask) for _, image, mask in pairs)
        files += [path for pair in entries[split] for path in pair]
    return RawDataset(root=root, files=tuple(files), entries=entries,
                      read=partial(_read, root, ids, reading), channels=3, fit="resize",
                      classes=tuple(ids), problems=tuple(problems), reading=reading)


def _read(root: Path, ids: dict[str, int], reading: ReadOptions,
          entry: tuple[Path, Path]) -> list[RawItem]:
    """One image with a target per chosen class present in its label map."""
    image_path, label_path = entry
    problems: list[str] = []
    image = labels = None
    try:
        image = read_image(image_path, 3, reading)
    except DataError as err:
        problems.append(str(err))
    try:
        labels = read_labels(label_path)
        if labels.dtype != np.uint8 or not _VALID[labels].all():
            found = sorted(set(np.unique(labels).tolist()) - set(_LABEL_IDS.values()))
            what = f"label values {found[:8]}" if found else f"{labels.dtype} labels"
            raise DataError(f"{label_path}: {what}; expected 8-bit Cityscapes label ids 0-33 "
                            f"as in the official *_gtFine_labelIds.png files (not the color "
                            f"or trainIds images).")
    except DataError as err:
        problems.append(str(err))
        labels = None
    if image is not None and labels is not None:
        check_same_size(image, labels, image_path, label_path, problems)
    if problems or image is None or labels is None:
        raise DataProblems(problems)
    targets = []
    for name, label_id in ids.items():
        mask = labels == label_id
        if mask.any():
            targets.append(Target(name, name, mask.view(np.uint8)))
    return [RawItem(image=image, targets=tuple(targets),
                    source=image_path.relative_to(root).as_posix())]
