"""The prepared store: fixed-size patches of a dataset, decoded once, memory-mapped after.

``prepare_store`` reads a dataset's raw files through its ``DATASETS`` builder, cuts every
slice into non-overlapping square tiles, optionally drops tiles without foreground, holds out a
seeded fraction of the training tiles as ``val`` and writes::

    <cache_dir>/<name>-<key12>/
        images.npy   (N, P, P) uint8
        masks.npy    (N, P, P) uint8, 0/1
        index.json   samples, per-split index lists, counts, parameters, content hash

``key12`` hashes the dataset name, the raw files' names, sizes and mtimes and the parameters,
so preparing again with the same inputs reuses the folder without decoding anything.
``hash`` inside index.json is a sha256 of the arrays and the index: the ``segtune.data_hash``
tag that ties a run to the exact patches it saw. ``counts.dropped_empty`` is keyed by the raw
stack a tile came from (``train`` covers both the train and val splits, as val is held out
after dropping).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segtune.errors import ConfigError, DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_FILES = ("images.npy", "masks.npy", "index.json")


@dataclass(frozen=True)
class RawDataset:
    """What a ``DATASETS`` builder returns: where the raw files are, and how to read a split.

    ``files`` key the store (name, size, mtime), so a builder must list every file it reads.
    ``load(split)`` with split ``"train"`` or ``"test"`` returns ``(images (N,H,W) uint8,
    masks (N,H,W) uint8 0/1, source name)``.
    """

    root: Path
    files: tuple[Path, ...]
    load: Callable[[str], tuple[np.ndarray, np.ndarray, str]]


def prepare_store(
    name: str,
    root: Path,
    cache_dir: Path,
    *,
    patch_size: int = 256,
    drop_empty: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Prepare (or reuse) the patch store of dataset ``name`` read from ``root``.

    Returns the store folder under ``cache_dir``. A store with the same key is returned as is;
    otherwise it is built in a temporary folder and renamed into place, so an interrupted
    prepare never leaves a partial store behind. ``progress`` receives short status lines.
    """
    from segtune.data import DATASETS  # the registry imports this module

    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r} in dataset.name; known datasets: "
                          f"{', '.join(sorted(DATASETS))}.")
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    say = progress or (lambda line: None)
    # Plain Python types: the parameters go into the folder key and index.json as JSON.
    params = {"patch_size": int(patch_size), "drop_empty": bool(drop_empty),
              "val_fraction": float(val_fraction), "seed": int(seed)}

    raw = DATASETS[name](Path(root))
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{_store_key(name, raw, params)}"
    if (final / "index.json").is_file():
        say(f"reusing prepared store {final}")
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        _build(name, raw, params, tmp, say)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            # Another prepare with the same key finished first: its store is as good as ours.
            if not (final / "index.json").is_file():
                raise DataError(f"Could not move the prepared store into {final} ({exc}); "
                                f"remove that folder and prepare again.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(open_store(final).summary())
    return final


def _store_key(name: str, raw: RawDataset, params: dict[str, Any]) -> str:
    """12 hex digits over the dataset name, raw file stats and the parameters."""
    files = []
    for path in raw.files:
        stat = path.stat()
        files.append([path.relative_to(raw.root).as_posix(), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"format": FORMAT_VERSION, "dataset": name, "params": params,
                       "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _build(name: str, raw: RawDataset, params: dict[str, Any], out: Path,
           say: Callable[[str], None]) -> None:
    """Decode, tile, filter and split both stacks, then write the three store files."""
    size = params["patch_size"]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    samples: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    for stack in ("train", "test"):
        say(f"reading the {stack} split of {name} from {raw.root}")
        images, masks, source = raw.load(stack)
        say(f"{source}: {images.shape[0]} slices of {images.shape[1]}x{images.shape[2]}")
        tiles, tile_masks = _tile(images, size), _tile(masks, size)
        if tiles.size == 0:
            raise DataError(f"The slices of {source} in {raw.root} are {images.shape[1]}x"
                            f"{images.shape[2]} pixels, smaller than patch_size {size}; "
                            f"choose a smaller dataset.patch_size.")
        keep = (tile_masks.any(axis=(3, 4)) if params["drop_empty"]
                else np.ones(tiles.shape[:3], dtype=bool))
        dropped[stack] = int((~keep).sum())
        # Boolean indexing of the tile views copies only the kept tiles, once.
        parts.append((tiles[keep], tile_masks[keep]))
        samples += [{"split": stack, "source": source, "slice": int(s), "y": int(r) * size,
                     "x": int(c) * size} for s, r, c in np.argwhere(keep)]
        del images, masks, tiles, tile_masks

    # Validation comes from the training stack, shuffled by tile with the given seed.
    train_ids = np.array([i for i, s in enumerate(samples) if s["split"] == "train"])
    if len(train_ids) == 0:
        raise DataError(f"Every training patch of {name} in {raw.root} has an empty mask, so "
                        f"there is nothing to train on; check the label files.")
    order = np.random.default_rng(params["seed"]).permutation(len(train_ids))
    val_ids = set(train_ids[order[: int(round(params["val_fraction"] * len(train_ids)))]].tolist())
    for i in val_ids:
        samples[i]["split"] = "val"
    splits = {split: [i for i, s in enumerate(samples) if s["split"] == split] for split in SPLITS}

    # Copy part by part into memory-mapped files so the full set is never held twice.
    total = len(samples)
    images_out = np.lib.format.open_memmap(out / "images.npy", "w+", np.uint8, (total, size, size))
    masks_out = np.lib.format.open_memmap(out / "masks.npy", "w+", np.uint8, (total, size, size))
    start = 0
    for tiles, tile_masks in parts:
        images_out[start:start + len(tiles)] = tiles
        masks_out[start:start + len(tiles)] = tile_masks
        start += len(tiles)
    images_out.flush()
    masks_out.flush()

    index: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "dataset": name,
        "params": params,
        "counts": {"samples": {split: len(ids) for split, ids in splits.items()},
                   "dropped_empty": dropped},
        "splits": splits,
        "samples": samples,
    }
    index["hash"] = _content_hash(images_out, masks_out, index)
    del images_out, masks_out
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def _tile(stack: np.ndarray, size: int) -> np.ndarray:
    """A (N, rows, cols, size, size) view of the non-overlapping tiles; borders dropped."""
    n, height, width = stack.shape
    rows, cols = height // size, width // size
    cropped = stack[:, : rows * size, : cols * size]
    return cropped.reshape(n, rows, size, cols, size).transpose(0, 1, 3, 2, 4)


def _content_hash(images: np.ndarray, masks: np.ndarray, index: dict[str, Any]) -> str:
    """sha256 over image bytes, mask bytes and the canonical index JSON (without ``hash``)."""
    digest = hashlib.sha256()
    for array in (images, masks):
        flat = array.reshape(len(array), -1)
        for start in range(0, len(flat), 1024):  # chunks keep memory flat for memmaps
            digest.update(np.ascontiguousarray(flat[start:start + 1024]).data)
    body = {key: value for key, value in index.items() if key != "hash"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class SegDataset(Dataset):
    """One split of a store: ``{"image": uint8 (1,P,P), "mask": float32 (1,P,P), "index"}``.

    Arrays are memory-mapped lazily and the maps are not pickled, so the dataset is cheap to
    send to DataLoader workers and Ray trial processes.
    """

    def __init__(self, path: Path, indices: Sequence[int], split: str) -> None:
        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = split
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = int(self.indices[i])
        if self._images is None or self._masks is None:
            self._images = np.load(self.path / "images.npy", mmap_mode="r")
            self._masks = np.load(self.path / "masks.npy", mmap_mode="r")
        image = torch.from_numpy(np.array(self._images[sample]))[None]
        mask = torch.from_numpy(self._masks[sample].astype(np.float32))[None]
        return {"image": image, "mask": mask, "index": sample}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_masks": None}

    def subset(self, n: int) -> SegDataset:
        """The first ``n`` samples of this split (all of them if it has fewer)."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return SegDataset(self.path, self.indices[:n], self.split)


class Store:
    """An opened prepared store; see :func:`open_store`."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index
        self.hash: str = index["hash"]
        self.dataset: str = index["dataset"]
        self.patch_size: int = index["params"]["patch_size"]

    def split(self, name: str) -> SegDataset:
        """The ``train``, ``val`` or ``test`` split as a torch Dataset."""
        if name not in self.index["splits"]:
            raise DataError(f"The store {self.path} has no split {name!r}; it has "
                            f"{', '.join(self.index['splits'])}.")
        return SegDataset(self.path, self.index["splits"][name], name)

    def summary(self) -> str:
        """One line: samples per split, dropped empty patches, patch size, content hash."""
        counts = self.index["counts"]
        samples = ", ".join(f"{split} {n}" for split, n in counts["samples"].items())
        dropped = ", ".join(f"{n} {stack}" for stack, n in counts["dropped_empty"].items())
        size = self.patch_size
        return (f"{self.dataset}: {samples} patches of {size}x{size}; dropped empty: {dropped}; "
                f"hash {self.hash[:12]}")

    def verify(self) -> None:
        """Recompute the content hash; raise DataError if the files were changed."""
        images = np.load(self.path / "images.npy", mmap_mode="r")
        masks = np.load(self.path / "masks.npy", mmap_mode="r")
        if _content_hash(images, masks, self.index) != self.hash:
            raise DataError(f"The store {self.path} does not match its recorded hash "
                            f"{self.hash[:12]}; it was modified. Delete it and prepare again.")


def open_store(path: Path) -> Store:
    """Open a folder written by :func:`prepare_store`; DataError if it is not one."""
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise DataError(f"{path} is not a prepared segtune store: {', '.join(missing)} "
                        f"missing (a store holds {', '.join(_FILES)}). Point to the folder "
                        f"that segtune.data.prepare_store returned.")
    try:
        index = json.loads((path / "index.json").read_text())
        shapes = {name: np.load(path / name, mmap_mode="r").shape for name in _FILES[:2]}
        expected = (len(index["samples"]), index["params"]["patch_size"],
                    index["params"]["patch_size"])
        if index.get("format") != FORMAT_VERSION or "hash" not in index:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT_VERSION}")
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(f"{path} is not a readable segtune store ({exc}); delete it and "
                        f"prepare again.") from exc
    if any(shape != expected for shape in shapes.values()):
        raise DataError(f"The arrays in {path} have shapes {shapes} but index.json describes "
                        f"{expected}; the store is damaged. Delete it and prepare again.")
    return Store(path, index)
