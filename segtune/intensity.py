"""How image values reach the 8 bit the store holds: ``dataset.intensity``.

Ground floor, apart from :mod:`segtune.data` (whose package imports every dataset module), so
that a promoted model's pyfunc (segtune.serving) maps raw request images the way training
mapped its files without importing the datasets' own dependencies. Values are mapped linearly
to 0..255, rounded and clipped:

- ``auto`` — 8-bit images as they are; 16-bit and float images are refused, naming the
  options, as their window is the user's decision;
- ``minmax`` — each image's own minimum to 0 and maximum to 255;
- ``{percentile: [low, high]}`` — each image's ``low``-th and ``high``-th percentiles
  (e.g. ``[1, 99.8]``, the microscopy convention);
- ``{window: [low, high]}`` — a fixed range for every image (CT, a known detector range).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segtune.errors import ConfigError, DataError

INTENSITIES = "auto, minmax, {percentile: [low, high]} or {window: [low, high]}"


def parse_intensity(value: Any) -> str | tuple[str, float, float]:
    """``dataset.intensity`` as the mapping takes it: ``auto``, ``minmax``, or (kind, low, high)."""
    if value in ("auto", "minmax"):
        return value
    if isinstance(value, Mapping) and len(value) == 1:
        (kind, bounds), = value.items()
        if kind in ("percentile", "window") and isinstance(bounds, (list, tuple)) \
                and len(bounds) == 2 and all(isinstance(b, (int, float)) and not
                                             isinstance(b, bool) for b in bounds):
            low, high = float(bounds[0]), float(bounds[1])
            if low < high and (kind == "window" or (0 <= low and high <= 100)):
                return kind, low, high
    raise ConfigError(f"dataset.intensity: {value!r} is not an intensity setting; expected "
                      f"{INTENSITIES}, with low < high (percentiles between 0 and 100).")


def to_uint8(pixels: np.ndarray, intensity: str | tuple[str, float, float],
             path: Path) -> np.ndarray:
    """``pixels`` mapped to uint8 by ``intensity`` (8-bit input under ``auto``: unchanged)."""
    if intensity == "auto":
        if pixels.dtype == np.uint8:
            return pixels
        if pixels.dtype == bool:
            return pixels.view(np.uint8) * np.uint8(255)
        low, high = value_range(pixels)
        raise DataError(f"{path}: {pixels.dtype} pixels (16-bit or float) in [{low:g}, "
                        f"{high:g}]; dataset.intensity auto reads only 8-bit images. Set "
                        f"dataset.intensity to minmax, {{percentile: [1, 99.8]}} or {{window: "
                        f"[low, high]}} to map them to 8 bit (segtune does not guess the window).")
    values = pixels.astype(np.float32 if pixels.itemsize <= 2 else np.float64)
    if intensity == "minmax":
        low, high = value_range(values)
    elif intensity[0] == "percentile":
        finite = values[np.isfinite(values)]
        low, high = (np.percentile(finite, intensity[1:]) if finite.size else (0.0, 0.0))
    else:
        low, high = intensity[1:]
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.rint(np.clip((values - low) * scale, 0, 255))
    return np.nan_to_num(out, nan=0.0).astype(np.uint8)


def value_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
