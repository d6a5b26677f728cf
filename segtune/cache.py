"""The embedding cache: one frozen-encoder pass over a store, shared by every trial that matches.

When a trial's policy leaves the image encoder frozen (SAM/MedSAM `mask_decoder`, PA-SAM
`adapter`, CLIPSeg `decoder`), `model.encode(images)` is the same in every epoch of every
trial. It is computed once into a memory-mapped `.npy` beside the prepared store::

    <store>/embeddings/<key>/embeddings.npy   (M, ...) one row per row of images.npy (fp16)
    <store>/embeddings/<key>/meta.json        the key's parts, shape, dtype, build time
    <store>/embeddings/<key>.lock             fcntl lock: one builder at a time, across processes

`key` hashes the encoder's weights (and its pixel normalisation), the store's content hash and
the model's preprocessing (class, input size, aspect handling) plus the stored dtype, so a
change to any of them lands in a new folder and the old one is never read. The folder appears
by one `rename` after it is complete, so a reader never sees half of it.

Trials then decode from cached rows (`decode_cached`, called by segtune.scoring's
`forward_batch`); images still travel in the batch because PA-SAM's detail branch needs them,
and they are cheap. The model answers what the cache asks of it (`Segmenter.encoder_state`,
`encoder_trains`, `embedding_batch_axis`); nothing here knows a model family by name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from segtune.config import ExperimentConfig
from segtune.data import open_store
from segtune.models import Segmenter
from segtune.progress import progress

if TYPE_CHECKING:
    from segtune.prompts import PromptBatch

# 2: the encoders' resizing follows the reference pipelines (antialiased, 8-bit levels; MedSAM bicubic).
FORMAT_VERSION = 2
DTYPES = {"float16": np.float16, "float32": np.float32}


def encoder_frozen(model: Segmenter) -> bool:
    """True when the model's encoder output may be cached: no parameter the encoder pass uses
    trains (SAM's encoder adapters live inside it)."""
    return model.cacheable_encoder and not model.encoder_trains()


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        # Bytes through a uint8 view: numpy has no bfloat16, and a view copies nothing.
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(model: Segmenter, store_hash: str, dtype: str = "float16",
              precision: str = "no") -> tuple[str, dict[str, Any]]:
    """The cache folder's name and the parts it hashes."""
    parts = {
        "format": FORMAT_VERSION,
        "store_hash": store_hash,
        "encoder": weights_hash(model.encoder_state()),
        # Preprocessing: the class picks the normalisation (MedSAM's min-max vs SAM's mean/std).
        "model_class": type(model).__name__,
        "image_size": int(model.image_size),
        "keep_aspect": bool(model.keep_aspect),
        "dtype": dtype,
        # The autocast the encoder ran under (the trial's train.precision): bf16 rows differ.
        "precision": precision,
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], parts


@dataclass
class EmbeddingCache:
    """A built cache folder, opened for reading; `wrap` turns a store split into a cached one."""

    path: Path
    key: str
    built: bool  # this call computed it (False: reused what an earlier trial or sweep left)

    @property
    def file(self) -> Path:
        return self.path / "embeddings.npy"

    def wrap(self, split: Any) -> CachedSplit:
        return CachedSplit(split, self.file)


class CachedSplit:
    """A store split whose items also carry `embedding`: the cached row of their image, as fp32.

    Like SegDataset, the memory maps open lazily and are not pickled (DataLoader workers, Ray).
    """

    def __init__(self, split: Any, file: Path):
        self.split, self.file = split, Path(file)
        self._emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._emb is None:
            # Copy-on-write: the rows are writable arrays, as torch.from_numpy wants (a read-only
            # map warns), with nothing copied and nothing ever written back to the cache file.
            self._emb = np.load(self.file, mmap_mode="c")
        item = self.split[i]
        row = self.split.image_row(item["index"])
        item["embedding"] = torch.from_numpy(np.asarray(self._emb[row], dtype=np.float32))
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_emb": None}


def build_or_open(model: Segmenter, store: Path, *, dtype: str = "float16", batch_size: int = 8,
                  precision: str = "no", log: Callable[[str], None] = print) -> EmbeddingCache:
    """The cache for (model's encoder, store, preprocessing): reused if built, else built once.

    It is encoded where the model is (move it to the trial's device first), in batches of
    `batch_size`, under autocast to `precision` (`bf16`, `fp16`, or `no`) as the trial's
    Accelerator would run it.

    The fcntl lock is held while checking and building, so a second trial (another process,
    another sweep) waits for the first and then reuses its result instead of building again.
    """
    store = Path(store)
    key, parts = cache_key(model, open_store(store).hash, dtype, precision)
    root = store / "embeddings"
    root.mkdir(exist_ok=True)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / "meta.json").is_file():
                return EmbeddingCache(final, key, built=False)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
            try:
                _compute(model, store, tmp, parts, dtype, batch_size, precision, log)
                os.rename(tmp, final)  # atomic: readers see all of it or none
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return EmbeddingCache(final, key, built=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _compute(model: Segmenter, store: Path, out: Path, parts: dict[str, Any], dtype: str,
             batch_size: int, precision: str, log: Callable[[str], None]) -> None:
    images = np.load(store / "images.npy", mmap_mode="r")
    axis = model.embedding_batch_axis
    start, was_training = time.perf_counter(), model.training
    device = next(model.parameters()).device
    model.eval()
    arr = None
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=AUTOCAST.get(precision),
                                             enabled=precision in AUTOCAST), \
                progress("embedding cache: encoding images", len(images), unit="images",
                         line=log) as bar:
            for lo in range(0, len(images), batch_size):
                x = torch.from_numpy(np.array(images[lo : lo + batch_size].transpose(0, 3, 1, 2)))  # a writable copy
                emb = model.encode(x.to(device)).float().movedim(axis, 0).cpu().numpy()
                if arr is None:
                    arr = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=DTYPES[dtype],
                                                    shape=(len(images), *emb.shape[1:]))
                arr[lo : lo + len(emb)] = emb
                bar.advance(len(emb))
    finally:
        model.train(was_training)
    assert arr is not None
    arr.flush()
    shape = list(arr.shape)
    del arr
    meta = dict(parts, shape=shape, seconds=round(time.perf_counter() - start, 3), built_at=time.time())
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"embedding cache: encoded {shape[0]} images on {device} in {meta['seconds']:.1f}s "
        f"-> {out.parent.name}/")


def for_trial(cfg: ExperimentConfig, model: Segmenter, store: Path,
              log: Callable[[str], None] = print) -> EmbeddingCache | None:
    """The trial's decision, logged: a cache when the encoder is frozen and `train.cache` allows.

    Built (when missing) on the device the model is on, under `train.precision`.
    """
    if cfg.train.cache == "off":
        log("embedding cache: off (train.cache=off)")
        return None
    if not model.cacheable_encoder:
        log(f"embedding cache: off ({type(model).__name__} has no cacheable encoder)")
        return None
    if model.encoder_trains():
        log(f"embedding cache: off: policy {cfg.model.freeze_policy!r} trains the encoder")
        return None
    cache = build_or_open(model, store, batch_size=cfg.train.batch_size, precision=cfg.train.precision, log=log)
    log(f"embedding cache: on (key {cache.key}, {'built' if cache.built else 'reused'})")
    return cache


def decode_cached(model: nn.Module, embedding: torch.Tensor, images: torch.Tensor,
                  prompts: PromptBatch) -> torch.Tensor:
    """Mask logits from cached rows `(B, ...)`: what `model(images, prompts)` returns, minus encode.

    Through the (possibly DDP-wrapped) model's forward, so gradients are synchronised.
    """
    inner = getattr(model, "module", model)  # Accelerate may wrap the model (DDP)
    return model(images, prompts, embeddings=embedding.movedim(0, inner.embedding_batch_axis))
