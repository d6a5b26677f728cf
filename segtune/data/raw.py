"""What a dataset module hands the store, and the one pass that reads, checks and cuts it.

A ``DATASETS`` builder returns a :class:`RawDataset`: the files it found, the entries of its
``train`` and ``test`` splits, a ``read(entry)`` that decodes one entry into
:class:`RawItem` objects (an image and its binary :class:`Target` masks), and the problems it
could see without decoding anything (missing pairs, missing folders).

:func:`scan` is the single pass over every entry that both ``segtune data check`` and
``prepare`` run: it collects every problem instead of stopping at the first, cuts each item to
``patch_size`` (``tile``: non-overlapping tiles, borders dropped; ``resize``: the whole image
resized to a square) and hands the kept patches to a sink, the store writer. Once a problem
is found nothing more is handed on, but reading continues so the report is complete.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segtune.data.modes import DEFAULT, ReadOptions, relabel
from segtune.errors import ConfigError, DataError
from segtune.progress import progress

#: The splits a dataset provides; ``val`` is held out of ``train`` by the store.
RAW_SPLITS = ("train", "test")
FITS = ("tile", "resize")


class DataProblems(DataError):
    """One or more problems with raw files, reported together.

    ``problems`` holds one line per problem, each naming a file and what was expected; the
    message is the single problem, or a heading followed by one line per problem.
    """

    def __init__(self, problems: Sequence[str], heading: str | None = None) -> None:
        self.problems = list(problems)
        if heading is None:
            message = "\n".join(self.problems)
        else:
            message = heading + ":\n" + "\n".join(f"  - {line}" for line in self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class Target:
    """One binary target of an image: class name, text prompt ("" if none), 0/1 mask.

    With ``dataset.masks: instances`` it also holds the instance label map (0 background,
    one value per object); with ``labels`` the values its label map holds, so the scan can
    tell a listed value that no mask has.
    """

    name: str
    text: str
    mask: np.ndarray  # (H, W) uint8 in {0, 1}
    instances: np.ndarray | None = None  # (H, W) integer labels, 0 background
    values: frozenset[int] = frozenset()


@dataclass(frozen=True)
class RawItem:
    """One decoded image with its targets; ``source`` is the file relative to the root."""

    image: np.ndarray  # (H, W) or (H, W, 3) uint8
    targets: tuple[Target, ...]
    source: str
    slice: int = 0  # the page of a stack; 0 for single images


@dataclass(frozen=True)
class RawDataset:
    """What a ``DATASETS`` builder returns; see the module docstring.

    ``files`` key the store (name, size, mtime), so a builder lists every file it reads.
    ``entries`` maps ``train`` and ``test`` to whatever ``read`` takes. ``channels`` (1 or 3)
    is what ``read`` returns; ``fit`` the dataset's default way to reach ``patch_size``;
    ``reading`` the settings its reads apply (the store keeps instance maps when
    ``reading.instances``).
    """

    root: Path
    files: tuple[Path, ...]
    entries: Mapping[str, Sequence[Any]]
    read: Callable[[Any], Sequence[RawItem]]
    channels: int = 1
    fit: str = "tile"
    classes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    reading: ReadOptions = DEFAULT  # dataset.intensity, masks, channel, as ``read`` applies them


@dataclass(frozen=True)
class Patch:
    """A ``patch_size`` square of an item: top-left corner in the source, image, masks."""

    y: int
    x: int
    image: np.ndarray  # (P, P, C)
    masks: list[np.ndarray]  # one (P, P) per target of the item
    instances: list[np.ndarray | None] = field(default_factory=list)  # aligned with masks


@dataclass
class ScanCounts:
    """Per raw split: items read, samples kept, samples dropped as empty, items too small."""

    items: Counter[str] = field(default_factory=Counter)
    samples: Counter[str] = field(default_factory=Counter)
    dropped_empty: Counter[str] = field(default_factory=Counter)
    too_small: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    instances: Counter[str] | None = None  # objects in kept samples (dataset.masks instances)

    def summary(self) -> dict[str, Any]:
        """Plain dicts, as index.json and ``data check --json`` show them."""
        out = {"items": {s: self.items[s] for s in RAW_SPLITS},
               "samples": {s: self.samples[s] for s in RAW_SPLITS},
               "dropped_empty": {s: self.dropped_empty[s] for s in RAW_SPLITS},
               "classes": dict(sorted(self.classes.items()))}
        if self.instances is not None:
            out["instances"] = {s: self.instances[s] for s in RAW_SPLITS}
        return out


#: A kept sample of a patch: its target, 0/1 mask and (masks: instances) its objects
#: renumbered 1..n as uint16, else None.
Kept = tuple[Target, np.ndarray, "np.ndarray | None"]
Sink = Callable[[str, RawItem, Patch, list[Kept]], None]


def cut(item: RawItem, size: int, fit: str) -> Iterator[Patch]:
    """The item's patches: non-overlapping tiles (borders dropped) or one resized square.

    Resizing uses bilinear (antialiased) interpolation for images and nearest neighbour for
    masks, so masks stay 0/1.
    """
    image = item.image if item.image.ndim == 3 else item.image[..., None]
    if fit == "resize":
        nearest = Image.Resampling.NEAREST
        yield Patch(0, 0, _resize(image, size, Image.Resampling.BILINEAR),
                    [_resize(t.mask, size, nearest) for t in item.targets],
                    [None if t.instances is None else
                     _resize(t.instances.astype(np.int32), size, nearest)
                     for t in item.targets])
        return
    height, width = image.shape[:2]
    for y in range(0, height - size + 1, size):
        for x in range(0, width - size + 1, size):
            yield Patch(y, x, image[y:y + size, x:x + size],
                        [t.mask[y:y + size, x:x + size] for t in item.targets],
                        [None if t.instances is None else t.instances[y:y + size, x:x + size]
                         for t in item.targets])


def _resize(array: np.ndarray, size: int, method: Image.Resampling) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return _resize(array[..., 0], size, method)[..., None]
    return np.asarray(Image.fromarray(array).resize((size, size), method))


def scan(name: str, raw: RawDataset, *, patch_size: int, fit: str, drop_empty: bool,
         where: str, sink: Sink | None = None,
         say: Callable[[str], None] = lambda line: None) -> ScanCounts:
    """Read every entry, cut and filter its items, and feed kept patches to ``sink``.

    Each split's reading shows a progress bar (counts and an ETA) on a terminal, or a plain
    line through ``say`` every few seconds otherwise. Raises :class:`DataProblems` with every
    problem found — including a split left without samples, or a foreground label value
    (``dataset.masks: {labels: [...]}``) that no mask holds — after reading everything,
    headed "N problems {where}".
    """
    if fit not in FITS:
        raise ConfigError(f"dataset.fit must be one of {', '.join(FITS)}, got {fit!r}.")
    problems = list(raw.problems)
    counts = ScanCounts()
    seen: set[int] = set()
    for split in RAW_SPLITS:
        entries = raw.entries.get(split, ())
        say(f"reading the {split} split of {name} from {raw.root} ({len(entries)} "
            f"{'entry' if len(entries) == 1 else 'entries'})")
        failed = 0
        with progress(f"{name} {split}", len(entries), unit="files", line=say) as bar:
            for entry in entries:
                try:
                    items = raw.read(entry)
                except DataProblems as err:
                    problems += err.problems
                    failed += 1
                    continue
                except DataError as err:
                    problems.append(str(err))
                    failed += 1
                    continue
                finally:
                    bar.advance()
                for item in items:
                    seen.update(*(target.values for target in item.targets))
                    _cut_item(split, item, patch_size, fit, drop_empty, counts,
                              sink if not problems else None)
        say(f"{split}: {counts.items[split]} images, {counts.samples[split]} samples kept, "
            f"{counts.dropped_empty[split]} dropped as empty"
            + (f", {failed} with problems" if failed else ""))
        # An empty split is worth its own problem unless the builder or the reads already
        # said why (a missing folder, unreadable files).
        if counts.samples[split] == 0 and not failed and (entries or not raw.problems):
            problems.append(_empty_problem(raw, split, counts, patch_size, fit, drop_empty))
    absent = sorted(set(raw.reading.labels) - seen)
    if absent and counts.items["train"] + counts.items["test"]:
        shown = sorted(seen)[:12]
        problems.append(f"{raw.root}: dataset.masks lists the label value"
                        f"{'s' if len(absent) > 1 else ''} {absent}, which no mask holds; the "
                        f"masks hold {shown}{'...' if len(seen) > 12 else ''}. Expected "
                        f"{{labels: [v, ...]}} to list values of the label maps.")
    if problems:
        count = len(problems)
        raise DataProblems(problems, f"{count} problem{'' if count == 1 else 's'} {where}")
    return counts


def _cut_item(split: str, item: RawItem, size: int, fit: str, drop_empty: bool,
              counts: ScanCounts, sink: Sink | None) -> None:
    """Cut one item into patches, count and filter its samples, hand kept ones to ``sink``."""
    counts.items[split] += 1
    tiles = 0
    for patch in cut(item, size, fit):
        tiles += 1
        kept: list[Kept] = []
        for i, (target, mask) in enumerate(zip(item.targets, patch.masks, strict=True)):
            if drop_empty and not mask.any():
                continue
            objects = None
            if target.instances is not None:
                objects, n = relabel(patch.instances[i])
                if counts.instances is None:
                    counts.instances = Counter()
                counts.instances[split] += n
            kept.append((target, mask, objects))
        counts.dropped_empty[split] += len(item.targets) - len(kept)
        counts.samples[split] += len(kept)
        counts.classes.update(target.name for target, _, _ in kept)
        if kept and sink is not None:
            sink(split, item, patch, kept)
    counts.too_small[split] += int(tiles == 0)


def _empty_problem(raw: RawDataset, split: str, counts: ScanCounts, size: int, fit: str,
                   drop_empty: bool) -> str:
    """Why a split ended up without samples, and what to change."""
    if not raw.entries.get(split):
        return f"{raw.root}: no {split} images found; see docs/datasets.md for the layout."
    reasons = [f"{counts.items[split]} images read"]
    if counts.too_small[split]:
        reasons.append(f"{counts.too_small[split]} smaller than the {size}x{size} tiles "
                       f"(set dataset.fit=resize or a smaller dataset.patch_size)")
    if counts.dropped_empty[split]:
        reasons.append(f"{counts.dropped_empty[split]} patches dropped because their mask is "
                       f"empty (dataset.drop_empty={str(drop_empty).lower()})")
    return (f"{raw.root}: the {split} split is empty after cutting into {size}x{size} "
            f"patches ({fit}) and filtering: {'; '.join(reasons)}; expected at least one sample.")
