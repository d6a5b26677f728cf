"""Synthetic twin of the EPFL electron-microscopy mitochondria dataset.

:func:`synth_em` writes the four files of the real EPFL layout (``training.tif``,
``training_groundtruth.tif``, ``testing.tif``, ``testing_groundtruth.tif``) so that every code
path that reads the real data can be exercised without downloading it. The images imitate the
look of the real stacks closely enough to make the task non-trivial:

- a textured mid-grey cytoplasm (smoothed noise at two scales, a gentle intensity ramp);
- dark, roughly elliptical mitochondria with a darker rim and cristae lines — these are the
  only labelled structures;
- unlabelled dark distractors: thin curved (single and double) membranes and small round
  vesicles, about as dark as the mitochondria, so a global threshold cannot solve it.

Everything is vectorised numpy (FFT smoothing, per-object bounding boxes), so the default
4 x 768 x 1024 stacks take well under a second per split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from segtune.data import lucchi_em
from segtune.data.lucchi_em import EPFL_FILES
from segtune.data.raw import RawDataset

# Mitochondria are placed one per cell of this size (plus extras) so that almost every
# 256x256 patch of a slice contains foreground and few patches are dropped as empty.
_CELL = 256


def synth_em(
    out: Path, *, slices: int = 4, height: int = 768, width: int = 1024, seed: int = 0
) -> Path:
    """Write a synthetic EM dataset in the EPFL layout into ``out`` and return ``out``.

    Each of the four files is a multi-page uint8 TIFF of shape ``(slices, height, width)``;
    ground-truth pages hold exactly 0 and 255. The result depends only on the arguments:
    the training and testing stacks draw from two streams derived from ``seed``.
    """
    if slices < 1 or height < 32 or width < 32:
        raise ValueError(f"synth_em needs slices >= 1 and height, width >= 32, got "
                         f"{slices} x {height} x {width}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stream, split in enumerate(("train", "test")):
        rng = np.random.default_rng([seed, stream])
        pages = [_slice(rng, height, width) for _ in range(slices)]
        images = np.stack([image for image, _ in pages])
        masks = np.stack([mask for _, mask in pages])
        image_name, mask_name = EPFL_FILES[split]
        # minisblack: one grey page per slice; tifffile would store 3 slices as one RGB page.
        tifffile.imwrite(out / image_name, images, photometric="minisblack")
        tifffile.imwrite(out / mask_name, masks, photometric="minisblack")
    return out


def build(root: Path, *, intensity: Any = "auto", masks: Any = "binary",
          channel: int | None = None) -> RawDataset:
    """Registry builder: generate the default synthetic stacks into ``root`` if absent.

    Existing files are left alone (a test may have written smaller stacks there), and the
    folder is then read exactly like the real dataset, with the same options.
    """
    root = Path(root)
    if not all((root / name).is_file() for pair in EPFL_FILES.values() for name in pair):
        synth_em(root)
    return lucchi_em.build(root, intensity=intensity, masks=masks, channel=channel)


def _slice(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image page (uint8) and its label page (0/255)."""
    shape = (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    # Cytoplasm: coarse and fine texture plus a ramp, like uneven staining and section
    # thickness in the real stacks.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    image = (rng.uniform(150, 175) + rng.uniform(-30, 30) * ramp
             + 16 * _smooth_noise(rng, shape, 50) + 7 * _smooth_noise(rng, shape, 12)
             + 6 * _smooth_noise(rng, shape, 2.5))

    cytoplasm = image.copy()
    image -= _membranes(rng, shape)
    _paint_vesicles(rng, image)
    mask = _paint_mitochondria(rng, image, cytoplasm)

    # Acquisition noise, then the microscope's slight blur.
    image += 9 * rng.standard_normal(shape, dtype=np.float32)
    image = _gaussian(image, 0.8)
    return np.clip(image, 0, 255).astype(np.uint8), np.where(mask, 255, 0).astype(np.uint8)


def _gaussian(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT (periodic borders are invisible under the texture)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=field.shape).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed white noise.

    Drawn directly in the frequency domain, and only where the Gaussian's transfer is not
    negligible: for the large sigmas used here that is a few hundred coefficients instead of
    a full-size noise image and a forward FFT.
    """
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    band = transfer > 1e-3
    count = int(band.sum())
    spectrum = np.zeros(transfer.shape, dtype=np.complex64)
    spectrum[band] = transfer[band] * (rng.standard_normal(count, dtype=np.float32)
                                       + 1j * rng.standard_normal(count, dtype=np.float32))
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-12)


def _membranes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Darkening (>= 0) from thin curved membranes, single and double.

    The zero level set of a smooth random field is a family of smooth curves; |f| / |grad f|
    approximates the distance to it, which gives lines of constant width without tracing
    any curve. A second field switches the lines on only in parts of the slice.
    """
    field = _smooth_noise(rng, shape, rng.uniform(25, 35))
    gy, gx = np.gradient(field)
    distance = np.abs(field) / (np.hypot(gy, gx) + 1e-6)
    single = np.exp(-(distance / 1.4) ** 2)
    double = np.exp(-((distance - 2.6) / 0.9) ** 2)
    kind = _smooth_noise(rng, shape, 60)
    lines = np.where(kind > 0, single, double)
    presence = np.clip(_smooth_noise(rng, shape, 50) + 0.9, 0, 1)
    return rng.uniform(80, 100) * lines * presence


def _paint_vesicles(rng: np.random.Generator, image: np.ndarray) -> None:
    """Darken small round vesicles (dark rim, lighter lumen) into ``image`` in place."""
    height, width = image.shape
    count = rng.poisson(110 * height * width / (768 * 1024))
    for _ in range(count):
        radius = rng.uniform(3, 11)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ys, xs, dy, dx = _box(cy, cx, radius + 3, image.shape)
        rho = np.hypot(dy, dx) / radius
        rim = np.exp(-(((rho - 1) * radius) / 1.3) ** 2)
        lumen = np.clip(1 - rho, 0, 1) ** 0.5
        image[ys, xs] -= rng.uniform(55, 85) * rim + rng.uniform(10, 70) * lumen


def _paint_mitochondria(rng: np.random.Generator, image: np.ndarray,
                        cytoplasm: np.ndarray) -> np.ndarray:
    """Paint mitochondria into ``image`` in place and return their boolean mask.

    Each one is drawn over ``cytoplasm`` (the background before distractors), so membranes
    and vesicles stop at its outline instead of running through it.
    """
    height, width = image.shape
    mask = np.zeros(image.shape, dtype=bool)
    cells = [(y, x) for y in range(0, height, _CELL) for x in range(0, width, _CELL)]
    extras = rng.integers(0, len(cells) // 2 + 2)
    placed: list[tuple[float, float, float]] = []
    for index in range(len(cells) + extras):
        # One per cell first (coverage of patches), then a few anywhere.
        cy0, cx0 = cells[index] if index < len(cells) else (0, 0)
        cell_h = min(_CELL, height - cy0) if index < len(cells) else height
        cell_w = min(_CELL, width - cx0) if index < len(cells) else width
        major = rng.uniform(20, 60)
        minor = max(14.0, major * rng.uniform(0.35, 0.85))
        for _ in range(20):  # a few tries to avoid heavy overlap with earlier ones
            cy, cx = cy0 + rng.uniform(0, cell_h), cx0 + rng.uniform(0, cell_w)
            if all(np.hypot(cy - y, cx - x) > 0.8 * (major + r) for y, x, r in placed):
                break
        else:
            continue
        placed.append((cy, cx, major))
        _paint_one(rng, image, cytoplasm, mask, cy, cx, major, minor)
    return mask


def _paint_one(rng: np.random.Generator, image: np.ndarray, cytoplasm: np.ndarray,
               mask: np.ndarray, cy: float, cx: float, major: float, minor: float) -> None:
    """One mitochondrion: wobbly ellipse, dark rim, lighter textured matrix, cristae."""
    ys, xs, dy, dx = _box(cy, cx, major * 1.15 + 3, image.shape)
    theta = rng.uniform(0, np.pi)
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    phi = np.arctan2(v / minor, u / major)
    wobble = 1 + 0.05 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.03 * np.sin(
        5 * phi + rng.uniform(0, 6.3))
    rho = np.hypot(u / major, v / minor) / wobble
    inside = rho < 1

    # Distance to the outline in pixels, approximated along the short axis.
    depth = (1 - rho) * minor
    rim = np.exp(-(np.clip(depth, 0, None) / 2.5) ** 2)
    period = rng.uniform(9, 16)
    bend = rng.uniform(-0.01, 0.01) * v**2  # cristae curve slightly
    cristae = np.clip((np.cos(2 * np.pi * (u + bend) / period + rng.uniform(0, 6.3)) - 0.55)
                      / 0.45, 0, 1) * (depth > 4)
    darkening = rng.uniform(30, 65) + 25 * cristae + 45 * rim
    # Soft one-pixel edge so the outline is not aliased; the label is the hard inside.
    alpha = np.clip(depth + 0.5, 0, 1)
    organelle = cytoplasm[ys, xs] - darkening
    image[ys, xs] = alpha * organelle + (1 - alpha) * image[ys, xs]
    mask[ys, xs] |= inside


def _box(cy: float, cx: float, half: float, shape: tuple[int, int]
         ) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Clipped bounding box around a centre and pixel offsets from the centre inside it."""
    y0, y1 = max(0, int(cy - half)), min(shape[0], int(cy + half) + 1)
    x0, x1 = max(0, int(cx - half)), min(shape[1], int(cx + half) + 1)
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), dy - cy, dx - cx
