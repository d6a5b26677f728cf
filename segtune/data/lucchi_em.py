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
training stack gives the ``train`` and ``val`` splits, the testing stack ``test``. Each slice
is cut into non-overlapping ``patch_size`` tiles (``fit: tile``; 12 tiles of 256x256 per
768x1024 slice, 1980 per split), and tiles without mitochondria are dropped when
``drop_empty`` is true. Every sample has the class ``mitochondria`` and no text.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from segtune.data.raw import DataProblems, RawDataset, RawItem, Target
from segtune.data.readers import binary_mask
from segtune.errors import DataError

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

Split = tuple[np.ndarray, np.ndarray, str]


def build(root: Path) -> RawDataset:
    """Registry builder: locate both splits under ``root`` without decoding anything.

    A split whose files are missing is a problem in the returned dataset (reported with any
    others by ``check`` and ``prepare``), not an immediate error.
    """
    root = Path(root)
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
                      read=lambda split: _items(root, split), channels=1, fit="tile",
                      classes=(CLASS,), problems=tuple(problems))


def _items(root: Path, split: str) -> list[RawItem]:
    """One item per slice; the stacks are read whole (165 x 768 x 1024 is 130 MB)."""
    images, masks, source = load_split(root, split)
    return [RawItem(image=images[s], targets=(Target(CLASS, "", masks[s]),), source=source,
                    slice=s) for s in range(len(images))]


def load_split(root: Path, split: str) -> Split:
    """Read one split: ``(images (N,H,W) uint8, masks (N,H,W) uint8 in {0,1}, source)``.

    ``split`` is ``"train"`` or ``"test"``; ``source`` is the image file (EPFL layout) or
    folder (Lucchi++) name, recorded per patch in the prepared store. Raises
    :class:`~segtune.data.raw.DataProblems` (a DataError) with every problem of the split:
    missing or unreadable files, non-uint8 images, a different number of image and label
    slices, mismatched slice sizes and label values other than {0,255} or {0,1}.
    """
    if split not in EPFL_FILES:
        raise ValueError(f"split must be one of {sorted(EPFL_FILES)}, got {split!r}")
    image_path, mask_path = _split_paths(Path(root), split)
    problems: list[str] = []
    images = masks = None
    try:
        images = _read_folder(image_path) if image_path.is_dir() else _read_tiff(image_path)
        _check_image(images, image_path)
    except DataError as err:
        problems.append(str(err))
        images = None
    try:
        labels = _read_folder(mask_path) if mask_path.is_dir() else _read_tiff(mask_path)
        masks = binary_mask(labels, mask_path, CLASS)
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
    return images, masks, image_path.name


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


def _read_tiff(path: Path) -> np.ndarray:
    """A TIFF as a (N,H,W) array; one page becomes one slice."""
    try:
        with tifffile.TiffFile(path) as tif:
            samples = tif.pages[0].samplesperpixel
            array = tif.asarray()
    except Exception as exc:  # tifffile raises many types for damaged files
        raise DataError(f"Could not read {path} as a TIFF stack ({type(exc).__name__}: "
                        f"{exc}). The file may be truncated or not a TIFF; download it "
                        f"again.") from exc
    if samples != 1:
        raise DataError(f"{path} stores {samples} colour samples per pixel; expected grey-level "
                        f"pages, one per slice, as in the EPFL release.")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise DataError(f"{path} has shape {array.shape}; expected a grey-level stack of "
                        f"shape (slices, height, width) or a single (height, width) page.")
    return array


def _read_folder(folder: Path) -> np.ndarray:
    """Per-slice files of a Lucchi++ folder, stacked in sorted name order."""
    paths = _slice_files(folder)
    if not paths:
        raise DataError(f"The folder {folder} holds no {'/'.join(_SLICE_SUFFIXES)} slice "
                        f"files; the Lucchi++ layout expects one image per slice there.")
    pages = []
    for path in paths:
        if path.suffix.lower() == ".png":
            try:
                with Image.open(path) as handle:
                    page = np.asarray(handle)
            except Exception as exc:  # PIL raises several types for damaged files
                raise DataError(f"Could not read {path} as a PNG image ({type(exc).__name__}: "
                                f"{exc}).") from exc
        else:
            page = _read_tiff(path)
            page = page[0] if page.shape[0] == 1 else page
        if page.ndim == 3 and page.shape[-1] in (3, 4) and (page[..., :3] == page[..., :1]).all():
            page = page[..., 0]  # grey saved as RGB(A)
        if page.ndim != 2:
            raise DataError(f"{path} has shape {page.shape}; expected one grey-level slice "
                            f"(height, width).")
        pages.append(page)
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


def _check_image(images: np.ndarray, path: Path) -> None:
    if images.dtype != np.uint8:
        raise DataError(
            f"{path} holds {images.dtype} pixels; expected 8-bit (uint8) grey levels as in "
            f"the EPFL release. Convert the stack to 8 bit first (deciding the intensity "
            f"window is up to you; segtune does not guess it).")
