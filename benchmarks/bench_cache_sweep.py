"""Benchmark 4: six 2-epoch decoder-only trials with and without the embedding cache.

In-process `run_trial` calls (Ray's own overhead is benchmark 2), over the whole synthetic EM
store (38 train / 10 val / 48 test, 96 image patches), with a `small` SAM preset registered
here whose encoder dominates the step as vit_b's does. The cached side pays for building the
cache (every image row of the store, once) inside its time. Goal >=8x.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import config, store, verdict, workdir
from segtune.models.sam import SAM_VARIANTS, SamSpec
from segtune.train import TrialContext, run_trial

TRIALS = 6
# ViT 384 wide, 6 deep at 256x256: ~20x the decoder's FLOPs per image (vit_b at 1024: ~97x).
SAM_VARIANTS.setdefault("small", SamSpec(384, 6, 6, (2, 5), image_size=256, prompt_dim=128, window=8,
                                         decoder_mlp=512, decoder_heads=4))


def sweep(root, cache: str) -> float:
    t = time.perf_counter()
    for i in range(TRIALS):
        lr = 1e-4 * (2 ** i)  # six different trials, as a sweep's sampled lr would be
        cfg = config(root, "model.variant=small", "model.train=mask_decoder", "train.epochs=2",
                     "train.batch_size=4", f"train.lr={lr}", f"train.cache={cache}")
        run_trial(cfg, TrialContext(store=store(cfg), workdir=root / f"{cache}-{i}", log=lambda _: None))
    return time.perf_counter() - t


def main() -> None:
    root = workdir("cache-sweep")
    store(config(root))
    off = sweep(root, "off")
    on = sweep(root, "auto")  # builds the cache in trial 1, reuses it in trials 2-6
    print(f"{TRIALS} trials x 2 epochs: without cache {off:.1f}s, with cache (build included) {on:.1f}s")
    verdict("cache sweep-level", off / on, ">=8x", off / on >= 8,
            "the cache covers all 96 image rows of the store; 6 uncached trials encode 864 images")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
