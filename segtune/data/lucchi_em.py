"""EPFL electron-microscopy mitochondria dataset (Lucchi et al.).

Source: EPFL CVLab, "Electron Microscopy Dataset" — a 5 x 5 x 5 µm section of the CA1
hippocampus imaged by FIB-SEM, with mitochondria annotated; two stacks of 165 slices of
768 x 1024 pixels. https://www.epfl.ch/labs/cvlab/data/data-em/
A. Lucchi, K. Smith, R. Achanta, G. Knott, P. Fua, "Supervoxel-Based Segmentation of
Mitochondria in EM Image Stacks with Learned Shape Features", IEEE TMI 2012.

Two folder layouts are read:

- EPFL: ``training.tif``, ``training_groundtruth.tif``, ``testing.tif``,
  ``testing_groundtruth.tif`` — multi-page uint8 TIFFs, labels 0/255.
- Lucchi++ (Casser et al., re-annotated): folders ``Train_In/``, ``Train_Out/``, ``Test_In/``,
  ``Test_Out/`` of per-slice ``.tif``/``.png`` files, paired by sorted file name.

Point ``dataset.root`` at the folder holding the four files (or the four folders). The
training stack gives the ``train`` and ``val`` splits, the testing stack ``test``. Stacks of
other bit depths, channels and label maps take ``dataset.intensity`` (per slice: each slice is
one image for ``minmax`` and ``percentile``), ``dataset.channel`` (for stacks of several
channels) and ``dataset.masks`` (instance labels per slice). Each slice is cut into non-overlapping ``patch_size`` tiles (``fit: tile``; 12 tiles of 256x256 per
768x1024 slice, 1980 per split), and tiles without mitochondria are dropped when
``drop_empty`` is true. Every sample has the class ``mitochondria`` and no text.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tifffile

from segtune.data.modes import (
    DEFAULT,
    ReadOptions,
    foreground,
    read_options,
    values_present,
)
from segtune.data.raw import DataProblems, RawDataset, RawItem, Target
from segtune.data.readers import read_image, read_labels
from segtune.errors import DataError
from segtune.intensity import to_uint8

#: The class name (and index ``class``) of every sample.
CLASS = "mitochondria"

#: split -> (image stack, label stack) in the EPFL layout.
EPFL_FILES: dict[str, tuple[str, str]] = {
    "train": ("training.tif", "training_groundtruth.tif"),
    "test": ("testing.tif", "testing_groundtruth.tif"),
}
#: split -> (image folder, label folder) in the Lucchi++ layout.
LUCCHI_PP_DIRS: dict[str, tuple[str, str]] = {
    "train": ("Train_In", "Train_Out"),
    "test": ("Test_In", "Test_Out"),
}
_SLICE_SUFFIXES = (".tif", ".tiff", ".png")



class Split(NamedTuple):
    """One decoded split: 8-bit images, 0/1 masks and the image file (or folder) name; with
    ``masks: instances`` the label stack too, with ``masks: labels`` the values it holds."""

    images: np.ndarray  # (N, H, W) uint8
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}
    source: str
    instances: np.ndarray | None = None
    values: frozenset[int] = frozenset()


def build(root: Path, *, intensity: Any = "auto", masks: Any = "binary",
          channel: int | None = None) -> RawDataset:
    """Registry builder: locate both splits under ``root`` without decoding anything.

    A split whose files are missing is a problem in the returned dataset (reported with any
    others by ``check`` and ``prepare``), not an immediate error.
    """
    root = Path(root)
    reading = read_options(intensity, masks, channel)
    files: list[Path] = []
    entries: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for split in EPFL_FILES:
        try:
            image_path, mask_path = _split_paths(root, split)
        except DataError as err:
            problems.append(str(err))
            entries[split] = ()
            continue
        for path in (image_path, mask_path):
            files.extend(_slice_files(path) if path.is_dir() else [path])
        entries[split] = (split,)
    return RawDataset(root=root, files=tuple(files), entries=entries,
                      read=partial(_items, root, reading), channels=1, fit="tile",
                      classes=(CLASS,), problems=tuple(problems), reading=reading)


def _items(root: Path, reading: ReadOptions, split: str) -> list[RawItem]:
    """One item per slice; the stacks are read whole (165 x 768 x 1024 is 130 MB)."""
    got = load_split(root, split, reading)
    return [RawItem(image=got.images[s], source=got.source, slice=s, targets=(Target(
        CLASS, "", got.masks[s], None if got.instances is None else got.instances[s],
        got.values),)) for s in range(len(got.images))]


def load_split(root: Path, split: str, reading: ReadOptions = DEFAULT) -> Split:
    """Read one split as a :class:`Split` (8-bit images, 0/1 masks, source, ...).

    ``split`` is ``"train"`` or ``"test"``; ``source`` is the image file (EPFL layout) or
    folder (Lucchi++) name, recorded per patch in the prepared store. ``reading`` holds the
    dataset's intensity, masks and channel settings, applied slice by slice. Raises
    :class:`~segtune.data.raw.DataProblems` (a DataError) with every problem of the split:
    missing or unreadable files, wide images without an intensity setting, a different number
    of image and label slices, mismatched slice sizes and label values other than {0,255} or
    {0,1} (with ``masks: binary``).
    """
    if split not in EPFL_FILES:
        raise ValueError(f"split must be one of {sorted(EPFL_FILES)}, got {split!r}")
    image_path, mask_path = _split_paths(Path(root), split)
    problems: list[str] = []
    images = masks = instances = None
    values: frozenset[int] = frozenset()
    try:
        if image_path.is_dir():  # Lucchi++: read and mapped to 8 bit file by file
            images = _read_folder(image_path, reading)
        else:
            images = _to_uint8(_read_tiff(image_path, reading.channel), image_path, reading)
    except DataError as err:
        problems.append(str(err))
        images = None
    try:
        labels = _read_folder(mask_path) if mask_path.is_dir() else _read_tiff(mask_path)
        masks, instances = foreground(labels, reading, mask_path, CLASS)
        values = values_present(labels) if reading.masks == "labels" else frozenset()
    except DataError as err:
        problems.append(str(err))
    if images is not None and masks is not None:
        if len(images) != len(masks):
            problems.append(
                f"{mask_path}: {len(masks)} label slices but {image_path} has {len(images)} "
                f"image slices; expected one label slice per image slice. Check that the two "
                f"files belong to the same split.")
        elif images.shape != masks.shape:
            problems.append(
                f"{mask_path}: slices of {masks.shape[2]}x{masks.shape[1]} pixels but the "
                f"slices of {image_path} are {images.shape[2]}x{images.shape[1]}; expected "
                f"the same size (width x height) slice for slice.")
    if problems or images is None or masks is None:
        raise DataProblems(problems)
    return Split(images, masks, image_path.name, instances, values)


def _split_paths(root: Path, split: str) -> tuple[Path, Path]:
    """The image and label paths of ``split``, whichever layout ``root`` uses."""
    epfl = [root / name for name in EPFL_FILES[split]]
    if all(path.is_file() for path in epfl):
        return epfl[0], epfl[1]
    folders = [root / name for name in LUCCHI_PP_DIRS[split]]
    if all(path.is_dir() for path in folders):
        return folders[0], folders[1]
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir()) \
        if root.is_dir() else []
    shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "nothing"
    raise DataError(
        f"No EPFL EM {split} data in {root}: expected the files {EPFL_FILES[split][0]} and "
        f"{EPFL_FILES[split][1]} (EPFL layout, all four of training.tif, "
        f"training_groundtruth.tif, testing.tif, testing_groundtruth.tif) or the folders "
        f"{LUCCHI_PP_DIRS[split][0]}/ and {LUCCHI_PP_DIRS[split][1]}/ (Lucchi++ layout), but "
        f"found {shown}. Download the stacks from https://www.epfl.ch/labs/cvlab/data/data-em/ "
        f"or use the dataset name synthetic_em.")


def _read_tiff(path: Path, channel: int | None = None) -> np.ndarray:
    """A TIFF as a (N,H,W) array; one page (or ImageJ z-plane) becomes one slice.

    A stack with a channel axis (ImageJ ``C``, or several samples per pixel) needs
    ``dataset.channel``, which picks one; the values keep their type (see ``_to_uint8``).
    """
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except Exception as exc:  # tifffile raises many types for damaged files
        raise DataError(f"Could not read {path} as a TIFF stack ({type(exc).__name__}: "
                        f"{exc}). The file may be truncated or not a TIFF; download it "
                        f"again.") from exc
    shown = f"shape {tuple(array.shape)}, axes {axes}"
    if not array.size or "Y" not in axes or "X" not in axes:
        raise DataError(f"Could not read {path} as a TIFF stack (no image data: {shown}). The "
                        f"file may be truncated or not a TIFF; download it again.")
    keep = [i for i, axis in enumerate(axes) if array.shape[i] > 1 or axis in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    channels = [i for i, axis in enumerate(axes) if axis in "CS"]
    if len(channels) == 1:
        count = array.shape[channels[0]]
        if channel is None or channel >= count:
            raise DataError(f"{path}: a stack with {count} channels ({shown}); expected "
                            f"grey-level pages, one per slice, as in the EPFL release, or "
                            f"dataset.channel set to the channel to read (0 to {count - 1}).")
        array = np.take(array, channel, axis=channels[0])
        axes = axes.replace(axes[channels[0]], "")
    elif channel not in (None, 0):
        raise DataError(f"{path}: dataset.channel is {channel} but the stack has one channel "
                        f"({shown}); expected a channel number from 0 to 0.")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or not axes.endswith("YX"):
        raise DataError(f"{path} has {shown}; expected a grey-level stack of shape (slices, "
                        f"height, width) or a single (height, width) page.")
    return array


def _read_folder(folder: Path, reading: ReadOptions | None = None) -> np.ndarray:
    """Per-slice files of a Lucchi++ folder, stacked in sorted name order: images (with
    ``reading``) as 8-bit grey through the shared readers, labels as their raw values."""
    paths = _slice_files(folder)
    if not paths:
        raise DataError(f"The folder {folder} holds no {'/'.join(_SLICE_SUFFIXES)} slice "
                        f"files; the Lucchi++ layout expects one image per slice there.")
    pages = [read_image(path, 1, reading) if reading is not None else read_labels(path)
             for path in paths]
    shapes = {page.shape for page in pages}
    if len(shapes) > 1:
        raise DataError(f"The slices in {folder} differ in size ({sorted(shapes)}); all "
                        f"slices of a stack must have the same height and width.")
    return np.stack(pages)


def _slice_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order (slice2 before slice10)."""
    def key(path: Path) -> list[object]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in _SLICE_SUFFIXES
                   and not p.name.startswith(".")), key=key)


def _to_uint8(images: np.ndarray, path: Path, reading: ReadOptions) -> np.ndarray:
    """A stack mapped to 8 bit slice by slice (each slice is one image for ``minmax`` and
    ``percentile``); 8-bit stacks under ``intensity: auto`` are returned as they are."""
    if images.dtype == np.uint8 and reading.intensity == "auto":
        return images
    try:
        return np.stack([to_uint8(page, reading.intensity, path) for page in images])
    except DataError as err:
        if reading.intensity != "auto":
            raise
        raise DataError(f"{path} holds {images.dtype} pixels; dataset.intensity auto reads "
                        f"only 8-bit (uint8) grey levels as in the EPFL release. Set "
                        f"dataset.intensity to minmax, {{percentile: [1, 99.8]}} or {{window: "
                        f"[low, high]}} (applied per slice) to map them to 8 bit.") from err
