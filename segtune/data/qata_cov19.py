"""QaTa-COV19: chest X-rays of COVID-19 patients with infected-region masks (Degerli et al.).

Source: https://www.kaggle.com/datasets/aysendegerli/qatacov19-dataset (QaTa-COV19-v2, by
Qatar University and Tampere University). A. Degerli et al., "COVID-19 infection map
generation and detection from chest X-ray images", Health Inf. Sci. Syst. 9, 2021.
Optional text: the per-image descriptions of LViT (Z. Li et al., IEEE TMI 2023),
https://github.com/HUANGLIZI/LViT — ``Train_text.xlsx``, ``Val_text.xlsx``,
``Test_text.xlsx`` with the columns ``Image`` and ``Description``.

Point ``dataset.root`` at the folder holding ``Train Set/`` and ``Test Set/``::

    Train Set/Images/x.png   Train Set/Ground-truths/mask_x.png     (7145 pairs)
    Test Set/Images/x.png    Test Set/Ground-truths/mask_x.png      (2113 pairs)

Images are grey X-rays (colour files are converted to grey); masks are grey 0/255 (0/1 is
accepted too). ``Train Set`` gives ``train`` and ``val``, ``Test Set`` gives ``test``.

``description_file`` (one path or a list, relative to the root or absolute) names LViT
spreadsheets; each image's ``Description`` becomes its sample's text prompt (rows are matched
by image name, with or without the ``mask_`` prefix), and an image without a row is a problem.
Without it the text is empty. Every sample has the class ``infection``.

Getting to ``patch_size`` (``fit``): ``resize`` by default — each whole X-ray (224x224 in the
release) is resized to a ``patch_size`` square, bilinear for the image and nearest neighbour
for the mask, so one image is one sample as in the thesis. ``fit: tile`` cuts tiles instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from segtune.data.modes import ReadOptions, read_options
from segtune.data.raw import RawDataset, RawItem
from segtune.data.readers import image_files, missing_folder, pair_up, read_pair

CLASS = "infection"
#: Folder of the release -> segtune split.
SPLITS = {"Train Set": "train", "Test Set": "test"}
IMAGES, MASKS, PREFIX = "Images", "Ground-truths", "mask_"


def build(root: Path, *, description_file: str | Sequence[str] | None = None,
          intensity: Any = "auto", masks: Any = "binary", channel: int | None = None
          ) -> RawDataset:
    """Registry builder: pair images with their ``mask_`` files and read the descriptions."""
    root = Path(root)
    reading = read_options(intensity, masks, channel)
    problems: list[str] = []
    entries: dict[str, tuple[tuple[Path, Path], ...]] = {}
    for folder, split in SPLITS.items():
        image_dir, mask_dir = root / folder / IMAGES, root / folder / MASKS
        absent = [d for d in (image_dir, mask_dir) if not d.is_dir()]
        for directory in absent:
            problems.append(missing_folder(
                directory, "QaTa-COV19 X-rays" if directory.name == IMAGES else "masks",
                "Point dataset.root at the folder holding 'Train Set' and 'Test Set'."))
        if absent:
            entries[split] = ()
            continue
        images = {p.stem: p for p in image_files(image_dir)}
        masks = {p.stem[len(PREFIX):]: p for p in image_files(mask_dir)
                 if p.stem.startswith(PREFIX)}
        problems += [f"{p}: not named {PREFIX}<image name>; expected every mask in {mask_dir} "
                     f"to be named after its image, e.g. {PREFIX}covid_1.png for covid_1.png."
                     for p in image_files(mask_dir) if not p.stem.startswith(PREFIX)]
        pairs, missing = pair_up(images, masks,
                                 lambda key, d=mask_dir: d / f"{PREFIX}{key}.png",
                                 lambda key, d=image_dir: d / f"{key}.png")
        problems += missing
        entries[split] = tuple((image, mask) for _, image, mask in pairs)

    files = [path for split in entries.values() for pair in split for path in pair]
    texts: dict[str, str] | None = None
    if description_file is not None:
        paths = [description_file] if isinstance(description_file, str) else description_file
        sheets = [Path(p) if Path(p).is_absolute() else root / p for p in paths]
        files += [sheet for sheet in sheets if sheet.is_file()]
        texts = read_descriptions(sheets, problems)
        for split, pairs_ in entries.items():
            lacking = [image for image, _ in pairs_ if _lookup(texts, image) is None]
            if lacking:
                shown = ", ".join(p.name for p in lacking[:5]) + (", ..." if len(lacking) > 5
                                                                  else "")
                problems.append(f"{lacking[0].parent}: {len(lacking)} {split} images have no "
                                f"row in {', '.join(map(str, sheets))} ({shown}); expected a "
                                f"Description for every image, matched by the Image column.")
    return RawDataset(root=root, files=tuple(files), entries=entries,
                      read=partial(_read, root, texts or {}, reading), channels=1,
                      fit="resize", classes=(CLASS,), problems=tuple(problems), reading=reading)


def read_descriptions(sheets: Sequence[Path], problems: list[str]) -> dict[str, str]:
    """``Image`` -> ``Description`` from LViT spreadsheets; unreadable sheets are problems."""
    from openpyxl import load_workbook  # only needed for the optional text

    texts: dict[str, str] = {}
    for sheet in sheets:
        try:
            book = load_workbook(sheet, read_only=True, data_only=True)
            rows = list(book.worksheets[0].iter_rows(values_only=True))
            book.close()
        except Exception as exc:  # openpyxl raises several types for missing or bad files
            problems.append(f"{sheet}: unreadable as an .xlsx spreadsheet "
                            f"({type(exc).__name__}: {exc}); expected LViT's text file with "
                            f"the columns Image and Description.")
            continue
        header = [str(cell).strip().lower() if cell is not None else "" for cell in
                  (rows[0] if rows else ())]
        if "image" not in header or "description" not in header:
            problems.append(f"{sheet}: columns {[c for c in header if c]}; expected the "
                            f"columns Image and Description in the first row.")
            continue
        image_col, text_col = header.index("image"), header.index("description")
        for row in rows[1:]:
            if row[image_col] is not None and row[text_col] is not None:
                texts[str(row[image_col]).strip()] = str(row[text_col]).strip()
    return texts


def _lookup(texts: Mapping[str, str], image: Path) -> str | None:
    """The description of an image, whether the sheet names the image or its mask."""
    for key in (image.name, PREFIX + image.name, image.stem, PREFIX + image.stem,
                f"{PREFIX}{image.stem}.png"):
        if key in texts:
            return texts[key]
    return None


def _read(root: Path, texts: Mapping[str, str], reading: ReadOptions,
          entry: tuple[Path, Path]) -> list[RawItem]:
    image_path, mask_path = entry
    image, target = read_pair(image_path, mask_path, 1, CLASS,
                              text=_lookup(texts, image_path) or "", what="infected region",
                              reading=reading)
    return [RawItem(image=image, targets=(target,),
                    source=image_path.relative_to(root).as_posix())]
