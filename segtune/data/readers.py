"""Reading raw image and mask files, each failure a problem that names the file.

Every dataset module reads through these helpers, so the same kind of damage gives the same
message whichever dataset it is in: a missing pair, an unreadable or truncated file, an
image/mask size mismatch, mask values outside {0,255} or {0,1}. Each helper raises
:class:`~segtune.errors.DataError` with one problem; :func:`read_pair` gathers the problems of
an image and its mask into one :class:`~segtune.data.raw.DataProblems`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from segtune.data.raw import DataProblems
from segtune.errors import ConfigError, DataError

#: Image files a folder-based dataset picks up (masks too; JPEG masks usually fail the value
#: check, which says why).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@contextmanager
def _opened(path: Path, what: str) -> Iterator[Image.Image]:
    """The loaded image file; a missing or damaged one becomes a DataError that names it.

    `what` ("an image", "a mask") completes the message. A DataError raised by the caller's
    own checks inside the block passes through unchanged.
    """
    try:
        with Image.open(path) as handle:
            handle.load()
            yield handle
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the file was listed but is gone.") from None
    except Exception as exc:  # PIL raises many types for damaged files
        raise DataError(f"{path}: unreadable as {what} ({type(exc).__name__}: {exc}); the "
                        f"file may be truncated or not an image. Download it again.") from None


def read_image(path: Path, channels: int) -> np.ndarray:
    """An 8-bit image as ``(H, W)`` uint8 (``channels`` 1) or ``(H, W, 3)`` (``channels`` 3).

    Colour files are converted to grey for a grey dataset and grey files repeated to RGB for a
    colour one; 16-bit and float images are refused, as choosing their intensity window is
    the user's decision.
    """
    with _opened(path, "an image") as handle:
        if handle.mode in _WIDE_MODES:
            raise DataError(f"{path}: {handle.mode} pixels (16-bit or float); expected an "
                            f"8-bit grey or RGB image. Convert it to 8 bit first (the "
                            f"intensity window is up to you; segtune does not guess it).")
        target = "L" if channels == 1 else "RGB"
        return np.asarray(handle if handle.mode == target else handle.convert(target))


def read_labels(path: Path) -> np.ndarray:
    """A label image's raw values as ``(H, W)`` integers, without judging them.

    Grey, palette (the indices), 1-bit and 16-bit files are read as they are; RGB(A) files
    must be grey stored as colour (all channels equal), as in datasets whose masks are
    black and white RGB PNGs.
    """
    with _opened(path, "a mask") as handle:
        if handle.mode == "1":
            return np.asarray(handle).astype(np.uint8)
        if handle.mode in ("L", "P", *_WIDE_MODES):
            return np.asarray(handle)
        if handle.mode in ("LA", "RGB", "RGBA"):
            pixels = np.asarray(handle)
            colour = pixels[..., :3] if handle.mode != "LA" else pixels[..., :1]
            if (colour != colour[..., :1]).any():
                raise DataError(f"{path}: a colour mask (its R, G and B differ); expected "
                                f"a black-and-white mask, grey or RGB with equal channels.")
            return colour[..., 0]
        raise DataError(f"{path}: a {handle.mode} image; expected a grey, 1-bit, palette "
                        f"or black-and-white RGB mask.")


def binary_mask(values: np.ndarray, path: Path, what: str = "foreground") -> np.ndarray:
    """Check that labels hold only {0,255} or only {0,1}; return them as 0/1 uint8.

    Works page by page on stacks: ``bincount`` of a whole 130 MB stack would briefly need
    1 GB as int64, and ``np.unique`` would sort it.
    """
    if values.dtype == bool:
        return values.view(np.uint8)
    if not np.issubdtype(values.dtype, np.integer) or (values.size and (
            values.min() < 0 or values.max() > 255)):
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        raise DataError(f"{path}: {values.dtype} labels in [{low}, {high}]; expected 0 "
                        f"(background) and 255 or 1 ({what}) for this binary task.")
    values = values.astype(np.uint8, copy=False)
    pages = [values] if values.ndim < 3 else values
    histogram = sum((np.bincount(page.ravel(), minlength=256) for page in pages),
                    np.zeros(256, np.int64))
    present = set(np.flatnonzero(histogram).tolist())
    if not (present <= {0, 255} or present <= {0, 1}):
        shown = sorted(present)[:8]
        raise DataError(f"{path}: mask values {shown}{'...' if len(present) > 8 else ''}; "
                        f"expected only 0 (background) and 255 ({what}), or 0 and 1. Resized or "
                        f"JPEG-compressed masks have in-between values; a multi-class label map "
                        f"needs a dataset that picks one class.")
    return (values != 0).view(np.uint8)


def read_pair(image_path: Path, mask_path: Path, channels: int,
              what: str = "foreground") -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its binary mask; every problem of the pair in one DataProblems."""
    problems: list[str] = []
    image = mask = None
    try:
        image = read_image(image_path, channels)
    except DataError as err:
        problems.append(str(err))
    try:
        mask = binary_mask(read_labels(mask_path), mask_path, what)
    except DataError as err:
        problems.append(str(err))
    if image is not None and mask is not None:
        check_same_size(image, mask, image_path, mask_path, problems)
    if problems or image is None or mask is None:
        raise DataProblems(problems)
    return image, mask


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: Path, mask_path: Path,
                    problems: list[str]) -> None:
    """Append a problem if the image and the mask differ in height or width."""
    if image.shape[:2] != mask.shape[:2]:
        problems.append(f"{mask_path}: {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                        f"{image_path} is {image.shape[1]}x{image.shape[0]}; a mask must have "
                        f"its image's size (width x height).")


def pair_up(images: Mapping[str, Path], masks: Mapping[str, Path],
            expected_mask: Callable[[str], Path], expected_image: Callable[[str], Path]
            ) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """Match images and masks by key; a problem for each one without its partner.

    Returns the pairs in key order and the problems, each naming the file found and the
    partner expected. The callables are used before ``pair_up`` returns, so lambdas over a
    loop's variables are safe.
    """
    pairs, problems = [], []
    for key in sorted(set(images) | set(masks)):
        if key not in masks:
            problems.append(f"{images[key]}: no mask; expected {expected_mask(key)}.")
        elif key not in images:
            problems.append(f"{masks[key]}: a mask without an image; expected "
                            f"{expected_image(key)}.")
        else:
            pairs.append((key, images[key], masks[key]))
    return pairs, problems


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden files skipped), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def split_by_seed(keys: Iterable[str], test_fraction: float, seed: int) -> set[str]:
    """The keys held out as the test split: a seeded shuffle of the sorted keys.

    Sorting first makes the split independent of the order the file system lists files in;
    with two or more keys each split gets at least one.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be between 0 and 1 (exclusive), got "
                          f"{test_fraction}.")
    ordered = sorted(keys)
    count = round(test_fraction * len(ordered))
    if len(ordered) >= 2:
        count = min(max(count, 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:count]}


def missing_folder(folder: Path, what: str, hint: str) -> str:
    """A problem for a missing folder that says what its parent holds instead."""
    parent = folder.parent
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in parent.iterdir()) \
        if parent.is_dir() else []
    shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "nothing"
    where = f"found {shown} in {parent}" if parent.is_dir() else f"{parent} does not exist"
    return f"{folder}: missing; expected the folder of {what} ({where}). {hint}"
