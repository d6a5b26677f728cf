"""Synthetic twins of the four file-based layouts: Cityscapes, Corsican Fire, QaTa-COV19, a folder.

Each ``synth_*`` writes small files in the real layout — the same names, 8-bit PNGs, the
same label conventions — so every code path that reads the real data runs without a
download, in well under a second (the EM twin is :mod:`segtune.data.synthetic`):

- :func:`synth_cityscapes`: street scenes (sky, buildings with windows, trees, sidewalk,
  road, cars, and a pedestrian in every other image) as ``*_leftImg8bit.png`` with
  ``*_gtFine_labelIds.png`` holding real Cityscapes label ids from ``cityscapesscripts``
  (and the ``*_gtFine_color.png`` the release has beside them).
- :func:`synth_fire`: flames over vegetation as ``NNN_rgb.png`` with white-on-black
  ``NNN_gt.png`` masks (grey and RGB alternately), in subfolders, in two sizes.
- :func:`synth_qata`: ``Train Set/`` and ``Test Set/`` with grey 224x224
  ``Images/covid_N.png`` and 0/255 ``Ground-truths/mask_covid_N.png``, plus
  ``Train_text.xlsx`` and ``Test_text.xlsx`` (columns ``Image``, ``Description``) in LViT's
  style. The X-rays are a plausible sketch, not anatomy: a bright body, two dark lung fields
  with ribs, and hazy brighter opacities — only those inside the lungs are labelled.
- :func:`synth_folder`: coloured blobs on texture as ``images/`` (PNG and one JPEG) with
  0/255 ``masks/`` of the same stems.

Everything is drawn from ``numpy.random.default_rng(seed)``: same arguments, same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import id2label, name2label
from PIL import Image

from segtune.data.qata_cov19 import IMAGES, MASKS, PREFIX

ID = {name: name2label[name].id for name in
      ("sky", "building", "vegetation", "sidewalk", "road", "car", "person")}
_LEVELS = ("upper", "middle", "lower")


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _grid(height: int, width: int) -> np.ndarray:
    """Row and column index arrays, stacked (unpack as ``yy, xx``)."""
    return np.mgrid[0:height, 0:width]


def _street(rng: np.random.Generator, height: int, width: int, person: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 image, label-id map uint8)."""
    yy, xx = _grid(height, width)
    labels = np.full((height, width), ID["sky"], np.uint8)
    horizon, kerb = int(0.55 * height), int(0.62 * height)
    x = 0
    while x < width:  # a row of buildings with gaps of sky between some of them
        w = int(rng.integers(width // 8, width // 4))
        top = int(rng.integers(int(0.08 * height), int(0.3 * height)))
        labels[top:horizon, x:x + w] = ID["building"]
        x += w + int(rng.integers(0, width // 16))
    cy, cx = rng.uniform(0.3, 0.4) * height, rng.uniform(0.1, 0.9) * width
    tree = ((yy - cy) / (0.16 * height)) ** 2 + ((xx - cx) / (0.09 * width)) ** 2 < 1
    labels[tree & (yy < horizon)] = ID["vegetation"]
    labels[horizon:kerb] = ID["sidewalk"]
    labels[kerb:] = ID["road"]
    for _ in range(int(rng.integers(1, 3))):
        h, w = int(0.12 * height), int(rng.uniform(0.12, 0.2) * width)
        y0, x0 = int(rng.uniform(0.68, 0.82) * height), int(rng.integers(0, width - w))
        labels[y0:y0 + h, x0:x0 + w] = ID["car"]
    if person:
        h, w = int(0.2 * height), max(4, int(0.02 * width))
        y0, x0 = kerb - h, int(rng.integers(0, width - w))
        labels[y0:y0 + h, x0:x0 + w] = ID["person"]

    # Natural-looking colours (not the label palette), per-object shading and noise.
    palette = {"sky": (150, 190, 235), "building": (120, 105, 95), "vegetation": (60, 110, 45),
               "sidewalk": (170, 165, 160), "road": (80, 80, 85), "person": (40, 40, 60)}
    image = np.zeros((height, width, 3), np.float32)
    for name, colour in palette.items():
        image[labels == ID[name]] = colour
    cars = labels == ID["car"]
    image[cars] = rng.uniform(20, 220, 3)
    image[(labels == ID["building"]) & (yy % 16 < 7) & (xx % 20 < 9)] = (60, 70, 90)  # windows
    image *= (1 - 0.3 * yy / height)[..., None] if rng.random() < 0.5 else 1.0
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def synth_cityscapes(out: Path, *, train: int = 3, val: int = 2, height: int = 256,
                     width: int = 512, seed: int = 0) -> Path:
    """Write ``train`` + ``val`` scenes in the Cityscapes layout into ``out``; return ``out``.

    Scenes are ``width`` x ``height`` (2:1 like the real 2048x1024); cities are ``aachen``
    (train) and ``frankfurt`` (val); image ``i`` has a person when ``i`` is odd.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    colours = np.array([id2label[i].color if i in id2label else (0, 0, 0) for i in range(256)],
                       np.uint8)
    for folder, city, count in (("train", "aachen", train), ("val", "frankfurt", val)):
        for i in range(count):
            image, labels = _street(rng, height, width, person=i % 2 == 1)
            stem = f"{city}_{i:06d}_000019"
            _save(image, out / "leftImg8bit" / folder / city / f"{stem}_leftImg8bit.png")
            gt = out / "gtFine" / folder / city
            _save(labels, gt / f"{stem}_gtFine_labelIds.png")
            _save(colours[labels], gt / f"{stem}_gtFine_color.png")
    return out


def synth_fire(out: Path, *, images: int = 5, seed: int = 0) -> Path:
    """Write ``images`` photographs in the Corsican Fire layout into ``out``; return ``out``.

    Images alternate between 512x384 and 768x512 and between the folders ``seq1/`` and
    ``seq2/``; masks alternate between grey (0/255) and RGB (black/white) PNGs.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    for i in range(images):
        height, width = (384, 512) if i % 2 == 0 else (512, 768)
        yy, xx = _grid(height, width)
        ground = int(rng.uniform(0.35, 0.5) * height)
        image = np.zeros((height, width, 3), np.float32)
        image[:ground] = (170, 190, 210)  # hazy sky
        image[ground:] = (55, 80, 40)  # vegetation
        image += 12 * np.sin(xx / rng.uniform(5, 9))[..., None] * (yy >= ground)[..., None]
        fire = np.zeros((height, width), bool)
        for _ in range(int(rng.integers(2, 5))):  # flame fronts: ellipses pointing upwards
            cy, cx = rng.uniform(ground, height - 20), rng.uniform(20, width - 20)
            ry, rx = rng.uniform(25, 70), rng.uniform(20, 60)
            fire |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        if fire.any():  # yellow-white at the top of the flames, orange-red below
            heat = np.clip(1 - (yy - yy[fire].min()) / height, 0, 1)
            flame = np.stack([np.full_like(heat, 255.0), 120 + 120 * heat,
                              40 + 150 * heat ** 3], -1)
            image[fire] = flame[fire]
        image += rng.normal(0, 6, image.shape)
        stem = out / f"seq{i % 2 + 1}" / f"{i + 1:03d}"
        _save(np.clip(image, 0, 255).astype(np.uint8), stem.with_name(stem.name + "_rgb.png"))
        mask = np.where(fire, 255, 0).astype(np.uint8)
        _save(mask if i % 2 == 0 else np.repeat(mask[..., None], 3, -1),
              stem.with_name(stem.name + "_gt.png"))
    return out


def synth_folder(out: Path, *, images: int = 6, height: int = 256, width: int = 320,
                 seed: int = 0) -> Path:
    """Write ``images/`` and ``masks/`` with matching stems into ``out``; return ``out``.

    Each image holds one to three coloured discs and squares (the foreground) and a few
    grey ones (distractors); image 0 is saved as JPEG, the rest as PNG; masks are 0/255.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    yy, xx = _grid(height, width)
    for i in range(images):
        image = 110 + 25 * np.sin(yy / 7.0 + rng.uniform(0, 6))[..., None] * np.ones(3)
        mask = np.zeros((height, width), bool)
        for k in range(int(rng.integers(3, 6))):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(15, 45)
            shape = (np.hypot(yy - cy, xx - cx) < r) if k % 2 == 0 else \
                (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            foreground = k < 2 or rng.random() < 0.3
            image[shape] = rng.uniform(0, 255, 3) if foreground else rng.uniform(60, 200)
            mask = (mask | shape) if foreground else (mask & ~shape)
        image += rng.normal(0, 5, image.shape)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        _save(pixels, out / "images" / f"sample_{i:03d}{'.jpg' if i == 0 else '.png'}")
        _save(np.where(mask, 255, 0).astype(np.uint8), out / "masks" / f"sample_{i:03d}.png")
    return out


def _xray(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One X-ray (uint8), its mask (0/255) and an LViT-style description of the mask."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.42) ** 6 + ((yy - 0.55) / 0.55) ** 6))
    image = 40 + 150 * body
    lungs: list[np.ndarray] = []
    areas: list[str] = []
    infection = np.zeros((size, size), bool)
    for side, cx in (("left", 0.32), ("right", 0.68)):
        lung = ((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        lungs.append(lung)
        image[lung] -= 70
        if rng.random() < 0.75 or (side == "right" and not areas):
            level = int(rng.integers(0, 3))
            cy = 0.3 + 0.2 * level + rng.uniform(-0.04, 0.04)
            blob = ((xx - cx - rng.uniform(-0.04, 0.04)) / rng.uniform(0.06, 0.1)) ** 2 + \
                ((yy - cy) / rng.uniform(0.06, 0.12)) ** 2 < 1
            infection |= blob & lung
            areas.append(f"{_LEVELS[level]} {side} lung")
    image += 20 * (np.sin(yy * size / 6.0) > 0.6) * (lungs[0] | lungs[1])  # ribs
    image[infection] += 45
    image += rng.normal(0, 4, image.shape)
    extent = "Bilateral" if len(areas) == 2 else "Unilateral"
    count = "two infected areas" if len(areas) == 2 else "one infected area"
    text = f"{extent} pulmonary infection, {count}, {' and '.join(areas)}."
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    return pixels, np.where(infection, 255, 0).astype(np.uint8), text


def synth_qata(out: Path, *, train: int = 6, test: int = 3, size: int = 224,
               seed: int = 0) -> Path:
    """Write a synthetic QaTa-COV19 release (with LViT text sheets) into ``out``."""
    from openpyxl import Workbook

    out = Path(out)
    rng = np.random.default_rng(seed)
    number = 0
    for folder, count, sheet in (("Train Set", train, "Train_text.xlsx"),
                                 ("Test Set", test, "Test_text.xlsx")):
        (out / folder / IMAGES).mkdir(parents=True, exist_ok=True)
        (out / folder / MASKS).mkdir(parents=True, exist_ok=True)
        book = Workbook()
        rows = book.active
        rows.append(["Image", "Description"])
        for _ in range(count):
            number += 1
            image, mask, text = _xray(rng, size)
            name = f"covid_{number}.png"
            Image.fromarray(image).save(out / folder / IMAGES / name)
            Image.fromarray(mask).save(out / folder / MASKS / f"{PREFIX}{name}")
            rows.append([name, text])
        book.save(out / sheet)
    return out
