"""The prepared store: fixed-size patches of a dataset, decoded once, memory-mapped after.

``prepare_store`` reads a dataset's raw files once through its ``DATASETS`` builder (see
:mod:`segtune.data.raw`), validating every file on the way, cuts every image to
``patch_size`` (tiles or a resize, the dataset's ``fit``), optionally drops samples without
foreground, holds out a seeded fraction of the training images as ``val`` and writes::

    <cache_dir>/<name>-<key12>/
        images.npy     (M, P, P, C) uint8, C = 1 (grey) or 3 (RGB): one row per patch of image
        masks.npy      (N, P, P) uint8, 0/1: one row per sample
        instances.npy  (N, P, P) uint16, only with ``dataset.masks: instances``: each sample's
                       objects renumbered 1..n within its patch (0 background)
        index.json     samples, per-split index lists, counts, parameters, content hash

A sample is one (image patch, target) pair, so a Cityscapes patch with five classes present
is stored once in ``images.npy`` and five times in ``masks.npy``; each sample records its
split, source file, slice, tile position, image row, class and text (and, with
``masks: instances``, its number of objects ``instances``).

``key12`` hashes the dataset name, the raw files' names, sizes and mtimes and the parameters,
so preparing again with the same inputs reuses the folder without decoding anything.
``hash`` inside index.json is a sha256 of the arrays and the index: the ``segtune.data_hash``
tag that ties a run to the exact patches it saw. ``counts.dropped_empty`` is keyed by the raw
split a sample came from (``train`` covers both the train and val splits).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from segtune.data.raw import Kept, Patch, RawDataset, RawItem, scan
from segtune.data.registry import resolve
from segtune.errors import DataError

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
_FILES = ("images.npy", "masks.npy", "index.json")
INSTANCES = "instances.npy"


def prepare_store(
    name: str,
    root: Path,
    cache_dir: Path,
    *,
    patch_size: int = 256,
    drop_empty: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    fit: str | None = None,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Prepare (or reuse) the patch store of dataset ``name`` read from ``root``.

    ``fit`` (``tile`` or ``resize``) overrides the dataset's default; ``options`` are the
    dataset's own (e.g. ``{"classes": ["car"]}`` for cityscapes). Returns the store folder
    under ``cache_dir``. A store with the same key is returned as is; otherwise every raw
    file is validated while the store is built in a temporary folder, which is renamed into
    place only if no problem was found — so an interrupted or failed prepare never leaves a
    store that looks complete. ``progress`` receives short status lines.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    say = progress or (lambda line: None)
    raw = resolve(name, Path(root), options)
    # Plain Python types: the parameters go into the folder key and index.json as JSON.
    params = {"patch_size": int(patch_size), "drop_empty": bool(drop_empty),
              "val_fraction": float(val_fraction), "seed": int(seed), "fit": fit or raw.fit,
              "options": json.loads(json.dumps(dict(options or {}), sort_keys=True))}

    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{_store_key(name, raw, params)}"
    if (final / "index.json").is_file():
        say(f"reusing prepared store {final}")
        say(open_store(final).summary())
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
        # Files outside the root (e.g. a description sheet given by absolute path) keep
        # their absolute path.
        where = path.relative_to(raw.root) if path.is_relative_to(raw.root) else path
        files.append([where.as_posix(), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"format": FORMAT_VERSION, "dataset": name, "params": params,
                       "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class _Appender:
    """Rows appended to a .npy file whose header is rewritten with the final count.

    numpy pads every .npy header so that the length of the first axis can grow in place
    (``GROWTH_AXIS_MAX_DIGITS``), so the data never has to be held in memory or copied.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: str = "|u1") -> None:
        self.path, self.row_shape, self.count = path, row_shape, 0
        self.dtype = np.dtype(dtype)
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 — closed by close()
        self._header()
        self.offset = self.file.tell()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(
            self.file, {"descr": self.dtype.str, "fortran_order": False,
                        "shape": (self.count, *self.row_shape)})

    def append(self, row: np.ndarray) -> int:
        """Write one row; returns its index."""
        if row.shape != self.row_shape or row.dtype != self.dtype:
            raise ValueError(f"{self.path.name}: row of {row.dtype} {row.shape}, expected "
                             f"{self.dtype} {self.row_shape}")
        self.file.write(np.ascontiguousarray(row).data)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        """Rewrite the header with the final row count and close the file."""
        if self.file.closed:
            return
        self.file.seek(0)
        self._header()
        if self.file.tell() != self.offset:  # numpy changed its header padding
            raise RuntimeError(f"{self.path}: the .npy header changed length when rewritten")
        self.file.close()


class _Writer:
    """The scan's sink: each kept patch's image once, then one mask and record per target
    (and its instance map, with ``masks: instances``)."""

    def __init__(self, out: Path, size: int, channels: int, instances: bool) -> None:
        self.images = _Appender(out / "images.npy", (size, size, channels))
        self.masks = _Appender(out / "masks.npy", (size, size))
        self.instances = _Appender(out / INSTANCES, (size, size), "<u2") if instances else None
        self.samples: list[dict[str, Any]] = []

    def __call__(self, split: str, item: RawItem, patch: Patch, kept: list[Kept]) -> None:
        row = self.images.append(patch.image)
        for target, mask, objects in kept:
            self.masks.append(mask)
            sample = {"split": split, "source": item.source, "slice": item.slice,
                      "y": patch.y, "x": patch.x, "image": row,
                      "class": target.name, "text": target.text}
            if self.instances is not None:
                if objects is None:
                    objects = np.zeros(mask.shape, np.uint16)
                self.instances.append(objects)
                sample["instances"] = int(objects.max())
            self.samples.append(sample)

    def close(self) -> None:
        self.images.close()
        self.masks.close()
        if self.instances is not None:
            self.instances.close()


def _build(name: str, raw: RawDataset, params: dict[str, Any], out: Path,
           say: Callable[[str], None]) -> None:
    """Validate, cut, filter and split the dataset, then write the store files."""
    writer = _Writer(out, params["patch_size"], raw.channels, raw.reading.instances)
    try:
        counts = scan(name, raw, patch_size=params["patch_size"], fit=params["fit"],
                      drop_empty=params["drop_empty"], sink=writer, say=say,
                      where=f"in the {name} data at {raw.root}; nothing was prepared")
    finally:
        writer.close()
    samples = writer.samples

    # Validation images come from the training split, shuffled by image row with the given
    # seed, so all samples of one patch (e.g. its Cityscapes classes) share a split.
    train_rows = list(dict.fromkeys(s["image"] for s in samples if s["split"] == "train"))
    order = np.random.default_rng(params["seed"]).permutation(len(train_rows))
    held = round(params["val_fraction"] * len(train_rows))
    val_rows = {train_rows[i] for i in order[:held].tolist()}
    for sample in samples:
        if sample["image"] in val_rows:
            sample["split"] = "val"
    splits = {split: [i for i, s in enumerate(samples) if s["split"] == split] for split in SPLITS}

    arrays = _arrays(out)
    index: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "dataset": name,
        "params": params,
        "channels": raw.channels,
        "counts": {"samples": {split: len(ids) for split, ids in splits.items()},
                   "images": len(arrays[0]),
                   "dropped_empty": counts.summary()["dropped_empty"],
                   "classes": counts.summary()["classes"]},
        "splits": splits,
        "samples": samples,
    }
    if raw.reading.instances:  # objects per split, and the most in one sample
        index["counts"]["instances"] = {
            **{split: sum(samples[i]["instances"] for i in ids) for split, ids in splits.items()},
            "max_per_sample": max((s["instances"] for s in samples), default=0)}
    index["hash"] = _content_hash(arrays, index)
    del arrays
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def _arrays(path: Path) -> list[np.ndarray]:
    """The store's arrays, memory-mapped: images, masks and (if kept) instances."""
    names = _FILES[:2] + ((INSTANCES,) if (path / INSTANCES).is_file() else ())
    return [np.load(path / name, mmap_mode="r") for name in names]


def _content_hash(arrays: Sequence[np.ndarray], index: dict[str, Any]) -> str:
    """sha256 over the arrays' bytes (images, masks, instances if kept) and the canonical
    index JSON (without ``hash``)."""
    digest = hashlib.sha256()
    for array in arrays:
        flat = array.reshape(len(array), -1)
        for start in range(0, len(flat), 1024):  # chunks keep memory flat for memmaps
            digest.update(np.ascontiguousarray(flat[start:start + 1024]).data)
    body = {key: value for key, value in index.items() if key != "hash"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


class SegDataset(Dataset):
    """One split of a store; each item is a dict::

        {"image": uint8 (C,P,P), "mask": float32 (1,P,P) in {0,1}, "index": int, "text": str}

    plus, in a store prepared with ``dataset.masks: instances``, ``"instances"``: int32
    (1,P,P), the sample's objects numbered 1..n (0 background), which point prompts use.

    ``index`` is the sample's position in the whole store (stable across runs, used to seed
    its prompts); ``text`` is its text prompt — a Cityscapes class name, a QaTa-COV19
    description — or ``""`` where the dataset has none. Arrays are memory-mapped lazily and
    neither the maps nor the per-sample table are pickled, so the dataset is cheap to send
    to DataLoader workers and Ray trial processes.
    """

    def __init__(self, path: Path, indices: Sequence[int] | np.ndarray, split: str) -> None:
        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = split
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._instances: np.ndarray | None = None
        self._rows: np.ndarray | None = None
        self._texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> None:
        self._images = np.load(self.path / "images.npy", mmap_mode="r")
        self._masks = np.load(self.path / "masks.npy", mmap_mode="r")
        if (self.path / INSTANCES).is_file():
            self._instances = np.load(self.path / INSTANCES, mmap_mode="r")
        samples = json.loads((self.path / "index.json").read_text())["samples"]
        self._rows = np.array([s["image"] for s in samples], dtype=np.int64)
        self._texts = [s["text"] for s in samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._images is None:
            self._open()
        assert self._images is not None and self._masks is not None
        assert self._rows is not None and self._texts is not None
        sample = int(self.indices[i])
        # (P, P, C) on disk, (C, P, P) for torch; the copy also detaches it from the map.
        image = torch.from_numpy(np.array(self._images[self._rows[sample]].transpose(2, 0, 1),
                                          order="C"))
        mask = torch.from_numpy(self._masks[sample].astype(np.float32))[None]
        item = {"image": image, "mask": mask, "index": sample, "text": self._texts[sample]}
        if self._instances is not None:
            item["instances"] = torch.from_numpy(self._instances[sample].astype(np.int32))[None]
        return item

    def image_row(self, sample: int) -> int:
        """The row of images.npy that store sample `sample` (an item's ``index``) was cut from."""
        if self._rows is None:
            self._open()
        return int(self._rows[sample])  # type: ignore[index]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_masks": None, "_instances": None,
                "_rows": None, "_texts": None}

    def subset(self, n: int) -> SegDataset:
        """The first ``n`` samples of this split (all of them if it has fewer)."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return SegDataset(self.path, self.indices[:n], self.split)

    def with_foreground(self) -> SegDataset:
        """The samples whose mask has some foreground (point and box prompts need it); this
        split itself when every sample has."""
        masks = np.load(self.path / "masks.npy", mmap_mode="r")
        keep = [i for i in self.indices if masks[i].any()]
        return SegDataset(self.path, keep, self.split) if len(keep) < len(self.indices) else self


class Store:
    """An opened prepared store; see :func:`open_store`."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.index = index
        self.hash: str = index["hash"]
        self.dataset: str = index["dataset"]
        self.patch_size: int = index["params"]["patch_size"]
        self.channels: int = index["channels"]

    def split(self, name: str) -> SegDataset:
        """The ``train``, ``val`` or ``test`` split as a torch Dataset."""
        if name not in self.index["splits"]:
            raise DataError(f"The store {self.path} has no split {name!r}; it has "
                            f"{', '.join(self.index['splits'])}.")
        return SegDataset(self.path, self.index["splits"][name], name)

    def info(self) -> dict[str, Any]:
        """What ``segtune data info --json`` prints: splits, counts, parameters, hash."""
        counts = self.index["counts"]
        return {"path": str(self.path), "dataset": self.dataset, "hash": self.hash,
                "patch_size": self.patch_size, "channels": self.channels,
                "fit": self.index["params"]["fit"], "options": self.index["params"]["options"],
                "splits": dict(counts["samples"]), "images": counts["images"],
                "dropped_empty": dict(counts["dropped_empty"]),
                "classes": dict(counts["classes"]),
                **({"instances": dict(counts["instances"])} if "instances" in counts else {})}

    def summary(self) -> str:
        """One line: samples per split, images, dropped empty samples, classes, hash."""
        info = self.info()
        samples = ", ".join(f"{split} {n}" for split, n in info["splits"].items())
        dropped = ", ".join(f"{n} {split}" for split, n in info["dropped_empty"].items())
        classes = ", ".join(f"{name} {n}" for name, n in info["classes"].items()) or "none"
        size, colour = self.patch_size, "RGB" if self.channels == 3 else "grey"
        objects = ""
        if "instances" in info:
            per = dict(info["instances"])
            most = per.pop("max_per_sample")
            objects = (f"; instances: {', '.join(f'{split} {n}' for split, n in per.items())} "
                       f"(at most {most} per sample)")
        return (f"{self.dataset}: {samples} samples of {size}x{size} ({colour}, {info['fit']}) "
                f"from {info['images']} image patches; dropped empty: {dropped}; classes: "
                f"{classes}{objects}; hash {self.hash[:12]}")

    def verify(self) -> None:
        """Recompute the content hash; raise DataError if the files were changed."""
        if _content_hash(_arrays(self.path), self.index) != self.hash:
            raise DataError(f"The store {self.path} does not match its recorded hash "
                            f"{self.hash[:12]}; it was modified. Delete it and prepare again.")


def open_store(path: Path) -> Store:
    """Open a folder written by :func:`prepare_store`; DataError if it is not one."""
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise DataError(f"{path} is not a prepared segtune store: {', '.join(missing)} "
                        f"missing (a store holds {', '.join(_FILES)}). Point to the folder "
                        f"that `segtune data prepare` printed.")
    try:
        index = json.loads((path / "index.json").read_text())
        if index.get("format") != FORMAT_VERSION or "hash" not in index:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT_VERSION}")
        shapes = {name: np.load(path / name, mmap_mode="r").shape for name in _FILES[:2]}
        size = index["params"]["patch_size"]
        expected = {"images.npy": (index["counts"]["images"], size, size, index["channels"]),
                    "masks.npy": (len(index["samples"]), size, size)}
        if "instances" in index["counts"]:
            shapes[INSTANCES] = np.load(path / INSTANCES, mmap_mode="r").shape
            expected[INSTANCES] = expected["masks.npy"]
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(f"{path} is not a readable segtune store ({exc}); delete it and "
                        f"prepare again.") from exc
    if shapes != expected:
        raise DataError(f"The arrays in {path} have shapes {shapes} but index.json describes "
                        f"{expected}; the store is damaged. Delete it and prepare again.")
    return Store(path, index)
