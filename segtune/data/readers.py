"""Reading raw image and mask files, each failure a problem that names the file.

Every dataset module reads through these helpers, so the same kind of damage gives the same
message whichever dataset it is in: a missing pair, an unreadable or truncated file, an
image/mask size mismatch, mask values outside {0,255} or {0,1}. They also apply a dataset's
reading settings (``dataset.intensity``, ``masks``, ``channel``; :mod:`segtune.data.modes`),
so every dataset takes them alike. Each helper raises
:class:`~segtune.errors.DataError` with one problem; :func:`read_pair` gathers the problems of
an image and its mask into one :class:`~segtune.data.raw.DataProblems`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from segtune.data.modes import DEFAULT, ReadOptions, foreground, values_present
from segtune.data.modes import binary_mask as binary_mask  # re-exported: the binary check
from segtune.data.raw import DataProblems, Target
from segtune.errors import ConfigError, DataError
from segtune.intensity import to_uint8

#: Image files a folder-based dataset picks up (masks too; JPEG masks usually fail the value
#: check, which says why).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_GREY_MODES = {"1", "L", "LA", *_WIDE_MODES}
# TIFFs tifffile decodes as they are; palette and other photometrics go through PIL.
_TIFF_PHOTOMETRIC = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)


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


def read_image(path: Path, channels: int, reading: ReadOptions = DEFAULT) -> np.ndarray:
    """An image as ``(H, W)`` uint8 (``channels`` 1) or ``(H, W, 3)`` (``channels`` 3).

    TIFFs are decoded with tifffile (16/32-bit, float, multi-page and multi-channel files),
    other files with PIL. ``reading.channel`` picks one channel or page; ``reading.intensity``
    maps the values to 8 bit (see :mod:`segtune.data.modes`). Colour images are converted to
    grey for a grey dataset (PIL's luma) and grey ones repeated to RGB for a colour one.
    """
    tiff = _tiff(path, "an image") if _is_tiff(path) else None
    if tiff is not None:
        pixels, axes, rgb = tiff
    else:
        with _opened(path, "an image") as handle:
            target = "L" if channels == 1 else "RGB"
            if handle.mode not in _WIDE_MODES and reading.channel is None:
                # 8-bit files: PIL's own conversion, byte for byte what segtune always read.
                pixels = np.asarray(handle if handle.mode == target else handle.convert(target))
                return to_uint8(pixels, reading.intensity, path)
            if handle.mode in _WIDE_MODES:
                pixels, rgb = np.asarray(handle), False
            else:
                rgb = handle.mode not in ("1", "L", "LA")
                pixels = np.asarray(handle.convert("RGB" if rgb else "L"))
            axes = "YXS" if rgb else "YX"
    pixels = to_uint8(_pick(pixels, axes, rgb, path, reading.channel), reading.intensity, path)
    if pixels.ndim == 2:
        return pixels if channels == 1 else np.repeat(pixels[..., None], 3, axis=2)
    return pixels if channels == 3 else np.asarray(Image.fromarray(pixels, "RGB").convert("L"))


def is_colour(path: Path, reading: ReadOptions = DEFAULT) -> bool:
    """Whether an image file reads as colour, from its header only (nothing is decoded)."""
    if reading.channel is not None:
        return False
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                if page.photometric in _TIFF_PHOTOMETRIC:
                    return page.photometric == tifffile.PHOTOMETRIC.RGB
        with Image.open(path) as handle:
            return handle.mode not in _GREY_MODES
    except Exception:  # unreadable files are reported when they are read
        return False


def _pick(pixels: np.ndarray, axes: str, rgb: bool, path: Path,
          channel: int | None) -> np.ndarray:
    """One grey ``(H, W)`` or RGB ``(H, W, 3)`` plane of a decoded image."""
    if pixels.ndim == 2:
        if channel not in (None, 0):
            raise DataError(f"{path}: dataset.channel is {channel} but the image has one "
                            f"channel ({pixels.shape[1]}x{pixels.shape[0]} pixels, grey); "
                            f"expected a channel number from 0 to 0.")
        return pixels
    if pixels.ndim == 3:
        count = pixels.shape[2]
        if channel is not None:
            if channel >= count:
                raise DataError(f"{path}: dataset.channel is {channel} but the image has "
                                f"{count} channels or pages ({_shape(pixels, axes)}); expected "
                                f"a channel number from 0 to {count - 1}.")
            return pixels[..., channel]
        if rgb and count in (3, 4):
            return pixels[..., :3]
        raise DataError(f"{path}: an image of {_shape(pixels, axes)}: {count} channels or "
                        f"pages, not one grey or RGB image; set dataset.channel to the one to "
                        f"read (0 to {count - 1}).")
    raise DataError(f"{path}: an image of {_shape(pixels, axes)}: more than one axis besides "
                    f"height and width; expected one grey or RGB image, or one axis of "
                    f"channels or pages for dataset.channel to pick from. Save one plane (or "
                    f"one stack of channels) per file.")


def _shape(pixels: np.ndarray, axes: str) -> str:
    return f"shape {tuple(pixels.shape)}, axes {axes}, {pixels.dtype}"


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _tiff(path: Path, what: str) -> tuple[np.ndarray, str, bool] | None:
    """A TIFF's first series with its axes moved to ``Y, X, other``, its axes string and
    whether its samples are RGB; None for palette and other photometrics PIL reads better."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.photometric not in _TIFF_PHOTOMETRIC:
                return None
            series = tif.series[0]
            pixels, axes = series.asarray(), series.axes
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the file was listed but is gone.") from None
    except Exception as exc:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable as {what} ({type(exc).__name__}: {exc}); the "
                        f"file may be truncated or not a TIFF. Download it again.") from None
    if not pixels.size or "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: unreadable as {what} (no image data: shape "
                        f"{tuple(pixels.shape)}, axes {axes}); the file may be truncated or "
                        f"not a TIFF. Download it again.")
    keep = [i for i, axis in enumerate(axes) if pixels.shape[i] > 1 or axis in "YX"]
    pixels = pixels.reshape([pixels.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if "Y" in axes and "X" in axes and axes.index("Y") < axes.index("X"):
        order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes)
                                                    if a not in "YX"]
        pixels, axes = pixels.transpose(order), "".join(axes[i] for i in order)
    return pixels, axes, page.photometric == tifffile.PHOTOMETRIC.RGB and axes == "YXS"


def read_labels(path: Path) -> np.ndarray:
    """A label image's raw values as ``(H, W)`` integers, without judging them.

    Grey, palette (the indices), 1-bit, 16- and 32-bit files are read as they are (TIFFs
    with tifffile); RGB(A) files must be grey stored as colour (all channels equal), as in
    datasets whose masks are black and white RGB PNGs.
    """
    tiff = _tiff(path, "a mask") if _is_tiff(path) else None
    if tiff is not None:
        pixels, axes, rgb = tiff
        if pixels.ndim == 3 and rgb:
            return _grey_labels(pixels[..., :3], path)
        if pixels.ndim != 2:
            raise DataError(f"{path}: a mask of {_shape(pixels, axes)}; expected one label "
                            f"image (height, width), grey or black-and-white RGB.")
        return pixels.view(np.uint8) if pixels.dtype == bool else pixels
    with _opened(path, "a mask") as handle:
        if handle.mode == "1":
            return np.asarray(handle).astype(np.uint8)
        if handle.mode in ("L", "P", *_WIDE_MODES):
            return np.asarray(handle)
        if handle.mode in ("LA", "RGB", "RGBA"):
            pixels = np.asarray(handle)
            return _grey_labels(pixels[..., :3] if handle.mode != "LA" else pixels[..., :1], path)
        raise DataError(f"{path}: a {handle.mode} image; expected a grey, 1-bit, palette "
                        f"or black-and-white RGB mask.")


def _grey_labels(colour: np.ndarray, path: Path) -> np.ndarray:
    if (colour != colour[..., :1]).any():
        raise DataError(f"{path}: a colour mask (its R, G and B differ); expected "
                        f"a black-and-white mask, grey or RGB with equal channels.")
    return colour[..., 0]


def label_target(name: str, text: str, labels: np.ndarray, path: Path, reading: ReadOptions,
                 what: str | None = None) -> Target:
    """A :class:`Target` from a label image (or stack) under ``dataset.masks``."""
    mask, instances = foreground(labels, reading, path, what or name)
    values = values_present(labels) if reading.masks == "labels" else frozenset()
    return Target(name, text, mask, instances=instances, values=values)


def read_pair(image_path: Path, mask_path: Path, channels: int, name: str, *, text: str = "",
              what: str | None = None, reading: ReadOptions = DEFAULT
              ) -> tuple[np.ndarray, Target]:
    """Read an image and its target ``name``; every problem of the pair in one DataProblems."""
    problems: list[str] = []
    image = target = None
    try:
        image = read_image(image_path, channels, reading)
    except DataError as err:
        problems.append(str(err))
    try:
        target = label_target(name, text, read_labels(mask_path), mask_path, reading, what)
    except DataError as err:
        problems.append(str(err))
    if image is not None and target is not None:
        check_same_size(image, target.mask, image_path, mask_path, problems)
    if problems or image is None or target is None:
        raise DataProblems(problems)
    return image, target


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
