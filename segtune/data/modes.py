"""How raw pixels become the store's 8-bit images and 0/1 masks: ``dataset.intensity``,
``dataset.masks`` and ``dataset.channel``.

Intensities are applied per image (for EM stacks per slice) by :mod:`segtune.intensity`,
which lives outside this package so that a served model can use it too.

Masks: ``binary`` (0/255 or 0/1), ``instances`` (an instance label map, 0 background and one
value per object, any value > 0 foreground; the objects are kept for ``k_points``) or
``{labels: [v, ...]}`` (a multi-class label map whose listed values are foreground).

The functions here work on arrays; :mod:`segtune.data.readers` applies them to files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segtune.errors import ConfigError, DataError
from segtune.intensity import parse_intensity as _intensity
from segtune.intensity import value_range

MASK_MODES = "binary, instances or {labels: [v, ...]}"


@dataclass(frozen=True)
class ReadOptions:
    """A dataset's reading settings, normalised (see :func:`read_options`)."""

    intensity: str | tuple[str, float, float] = "auto"  # or ("percentile"|"window", low, high)
    masks: str = "binary"  # binary, instances or labels
    labels: tuple[int, ...] = ()  # the foreground values of masks: labels
    channel: int | None = None

    @property
    def instances(self) -> bool:
        return self.masks == "instances"


DEFAULT = ReadOptions()


def read_options(intensity: Any = "auto", masks: Any = "binary",
                 channel: int | None = None) -> ReadOptions:
    """Validate the YAML values of ``dataset.intensity``, ``masks`` and ``channel``.

    Raises ConfigError naming the field and its options (the experiment file was already
    checked by segtune.config; this guards direct callers of the data API).
    """
    return ReadOptions(_intensity(intensity), *_masks(masks), _channel(channel))


def _masks(value: Any) -> tuple[str, tuple[int, ...]]:
    if value in ("binary", "instances"):
        return value, ()
    if isinstance(value, Mapping) and list(value) == ["labels"]:
        listed = value["labels"]
        if isinstance(listed, (list, tuple)) and listed and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in listed) \
                and len(set(listed)) == len(listed):
            return "labels", tuple(sorted(listed))
    raise ConfigError(f"dataset.masks: {value!r} is not a mask setting; expected {MASK_MODES} "
                      f"(distinct label values >= 0).")


def _channel(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ConfigError(f"dataset.channel: {value!r}; expected a channel number from 0, or "
                      f"nothing for grey and RGB images.")


def foreground(labels: np.ndarray, reading: ReadOptions, path: Path,
               what: str = "foreground") -> tuple[np.ndarray, np.ndarray | None]:
    """The 0/1 mask of a label image (or stack) under ``dataset.masks``, and for
    ``instances`` the label map itself (else None)."""
    if reading.masks == "binary":
        return binary_mask(labels, path, what), None
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        low, high = value_range(labels) if labels.size else (0, 0)
        raise DataError(f"{path}: {labels.dtype} labels in [{low:g}, {high:g}]; expected "
                        f"non-negative integer labels for dataset.masks {reading.masks}.")
    if reading.masks == "instances":
        return (labels > 0).view(np.uint8), labels
    return np.isin(labels, reading.labels).view(np.uint8), None


def values_present(labels: np.ndarray) -> frozenset[int]:
    """The distinct values of an integer label image."""
    if labels.dtype in (np.uint8, np.uint16):
        return frozenset(np.flatnonzero(np.bincount(labels.ravel())).tolist())
    return frozenset(np.unique(labels).tolist())


def relabel(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """A patch's instance labels renumbered 1..n (0 stays background), as uint16, and n."""
    values, inverse = np.unique(instances, return_inverse=True)
    count = len(values) - int(values[0] == 0)
    if count > np.iinfo(np.uint16).max:
        raise DataError(f"{count} instances in one patch; at most 65535 fit the store.")
    if values[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(instances.shape).astype(np.uint16), count


def binary_mask(values: np.ndarray, path: Path, what: str = "foreground") -> np.ndarray:
    """Check that labels hold only {0,255} or only {0,1}; return them as 0/1 uint8.

    Works page by page on stacks: ``bincount`` of a whole 130 MB stack would briefly need
    1 GB as int64, and ``np.unique`` would sort it. When the check fails the message says
    what the values look like (instance or class labels, a lossy or resized mask).
    """
    if values.dtype == bool:
        return values.view(np.uint8)
    if not np.issubdtype(values.dtype, np.integer) or (values.size and (
            values.min() < 0 or values.max() > 255)):
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        hint = diagnose(values) if np.issubdtype(values.dtype, np.integer) and low >= 0 else ""
        raise DataError(f"{path}: {values.dtype} labels in [{low}, {high}]; expected 0 "
                        f"(background) and 255 or 1 ({what}) for this binary task."
                        + (f" {hint}." if hint else ""))
    values = values.astype(np.uint8, copy=False)
    pages = [values] if values.ndim < 3 else values
    histogram = sum((np.bincount(page.ravel(), minlength=256) for page in pages),
                    np.zeros(256, np.int64))
    present = set(np.flatnonzero(histogram).tolist())
    if not (present <= {0, 255} or present <= {0, 1}):
        shown = sorted(present)[:8]
        hint = diagnose(values, histogram)
        raise DataError(f"{path}: mask values {shown}{'...' if len(present) > 8 else ''}; "
                        f"expected only 0 (background) and 255 ({what}), or 0 and 1. {hint}.")
    return (values != 0).view(np.uint8)


def diagnose(values: np.ndarray, histogram: np.ndarray | None = None) -> str:
    """What non-binary integer mask values look like, and the setting that reads them.

    ``histogram`` is the 256-bin count of 8-bit values (the binary check has it already).
    """
    if histogram is not None:
        present = np.flatnonzero(histogram)
        total, extreme = histogram.sum(), histogram[:11].sum() + histogram[245:].sum()
        between = len(present[(present > 10) & (present < 245)])
        if total and extreme / total >= 0.9 and between and histogram[245:].any():
            return (f"The values look like a resized or JPEG-compressed binary mask ({between} "
                    f"in-between values, {extreme / total:.0%} of pixels near 0 or 255); save "
                    f"masks losslessly (PNG or TIFF) at their image's size")
    else:
        present = np.unique(values)
    labels = present[present > 0]
    if len(labels) < 2:
        return ("For a label map set dataset.masks: instances (one value per object) or "
                "{labels: [v, ...]} (the values that are foreground)")
    return (f"The values look like instance labels ({labels[0]}..{labels[-1]}, {len(labels)} "
            f"values, {'touching' if _touching(values) else 'separate'} objects); set "
            f"dataset.masks: instances if each value is one object, or dataset.masks: "
            f"{{labels: [v, ...]}} if the values are classes")


def _touching(values: np.ndarray) -> bool:
    """Whether two different non-zero labels are neighbours (on the first page of a stack)."""
    page = values if values.ndim < 3 else values[0]
    for a, b in ((page[:, :-1], page[:, 1:]), (page[:-1], page[1:])):
        if ((a != b) & (a > 0) & (b > 0)).any():
            return True
    return False


def missing_labels(listed: Iterable[int], seen: Iterable[int]) -> list[int]:
    """The listed foreground values that no mask holds."""
    return sorted(set(listed) - set(seen))
