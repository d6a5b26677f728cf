"""Benchmark 6: samples/s from the prepared store vs decoding the same patches from PNG and TIFF.

The files are written here from the store's own arrays (one image + one mask file per sample),
so both sides yield the same tensors; goal >=5x.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import config, store, verdict, workdir
from segtune.data import open_store


def main() -> None:
    root = workdir("data")
    path = store(config(root))
    ds = open_store(path).split("train")
    images = np.load(path / "images.npy", mmap_mode="r")
    masks = np.load(path / "masks.npy", mmap_mode="r")
    files = root / "files"
    files.mkdir()
    for i in range(len(ds)):
        item = ds[i]
        grey = item["image"][0].numpy()
        Image.fromarray(grey).save(files / f"{i}.png")
        Image.fromarray(grey).save(files / f"{i}.tif")
        Image.fromarray(item["mask"][0].numpy().astype(np.uint8) * 255).save(files / f"mask_{i}.png")
    del images, masks
    rounds = 5

    def from_store() -> float:
        t = time.perf_counter()
        for _ in range(rounds):
            fresh = open_store(path).split("train")  # cold maps each round, as a new trial opens them
            for i in range(len(fresh)):
                fresh[i]
        return rounds * len(ds) / (time.perf_counter() - t)

    def from_files(ext: str) -> float:
        t = time.perf_counter()
        for _ in range(rounds):
            for i in range(len(ds)):
                torch.from_numpy(np.asarray(Image.open(files / f"{i}.{ext}"))[None].copy())
                torch.from_numpy(np.asarray(Image.open(files / f"mask_{i}.png")) > 0).float()[None]
        return rounds * len(ds) / (time.perf_counter() - t)

    s, png, tif = from_store(), from_files("png"), from_files("tif")
    print(f"{len(ds)} samples of 256x256: store {s:.0f}/s, PNG {png:.0f}/s, TIFF {tif:.0f}/s")
    verdict("data store vs PNG", s / png, ">=5x", s / png >= 5)
    verdict("data store vs TIFF", s / tif, ">=5x", s / tif >= 5)


if __name__ == "__main__":
    main()
